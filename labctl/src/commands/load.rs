//! `labctl load`: drive HTTP load at A and print the report (with a
//! progress bar on a terminal).

use std::io::IsTerminal;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use labctl::load::{self, LoadSpec};

use crate::cli::LoadArgs;

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let spec = LoadSpec {
        url: args.url,
        path: args.path,
        requests: args.requests,
        duration: args.duration,
        concurrency: args.concurrency,
        rps: args.rps,
        max_in_flight: 1024,
        id_max: args.id_max,
        seed: args.seed,
        timeout: args.timeout,
        live: None,
    };
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| progress_bar(spec.requests));
    let report = load::run(&spec, bar.clone()).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", report.table());
    Ok(())
}

/// A bar towards `requests`, or a spinner for a timed run.
fn progress_bar(requests: Option<u64>) -> ProgressBar {
    let bar = match requests {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos} requests ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
