//! `labctl load`: drive HTTP load at A or gRPC load at B and print the
//! report (with a progress bar on a terminal).

use std::io::IsTerminal;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use labctl::load::{self, LoadSpec};

use crate::cli::LoadArgs;

pub async fn run(mut args: LoadArgs) -> anyhow::Result<()> {
    let json = args.json.take();
    let spec = spec_of(args)?;
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| progress_bar(spec.requests));
    let report = load::run(&spec, bar.clone()).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(path) = &json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", report.table());
    Ok(())
}

/// The load to run; flags that do not apply to the target are refused
/// rather than ignored.
fn spec_of(args: LoadArgs) -> anyhow::Result<LoadSpec> {
    let url = match (args.url, args.grpc) {
        (Some(url), None) => url,
        (None, Some(addr)) => format!("grpc://{addr}"),
        _ => bail!("give one of --url or --grpc"),
    };
    let is_http = url.starts_with("http://");
    let path = if is_http {
        if args.method.is_some() {
            bail!("--method is for gRPC targets (grpc://, etcd://, --grpc); HTTP takes --path");
        }
        if args.connections.is_some() {
            bail!(
                "--connections is for gRPC straight at B; HTTP uses one connection per request in flight"
            );
        }
        args.path.unwrap_or_else(|| "/api/items/{rand}".into())
    } else {
        if args.path.is_some() {
            bail!("--path is for HTTP targets; gRPC takes --method");
        }
        args.method
            .unwrap_or_else(|| "lab.v1.Backend/GetItem".into())
    };
    let mut spec = LoadSpec::new(url, path);
    spec.requests = args.requests;
    spec.duration = args.duration;
    spec.concurrency = args.concurrency;
    spec.rps = args.rps;
    spec.max_in_flight = args.max_in_flight;
    spec.connections = args.connections.unwrap_or(1);
    spec.id_max = args.id_max;
    spec.seed = args.seed;
    spec.timeout = args.timeout;
    Ok(spec)
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Cmd};

    fn spec(args: &[&str]) -> anyhow::Result<LoadSpec> {
        let cli = Cli::try_parse_from(["labctl", "load"].iter().chain(args))?;
        let Cmd::Load(args) = cli.command else {
            panic!("not load")
        };
        spec_of(args)
    }

    #[test]
    fn grpc_is_a_shorthand_and_the_method_defaults_to_get_item() {
        let s = spec(&["--grpc", "127.0.0.1:50051", "--requests", "5"]).unwrap();
        assert_eq!(s.url, "grpc://127.0.0.1:50051");
        assert_eq!(s.path, "lab.v1.Backend/GetItem");
        assert_eq!(s.connections, 1);
        let s = spec(&[
            "--url",
            "etcd://127.0.0.1:2379/lab/services/backend",
            "--method",
            "lab.v1.Backend/SubmitJob",
            "--duration",
            "1s",
            "--rps",
            "10",
        ])
        .unwrap();
        assert_eq!(s.path, "lab.v1.Backend/SubmitJob");
        assert_eq!(s.rps, Some(10.0));
        assert_eq!(s.max_in_flight, load::DEFAULT_MAX_IN_FLIGHT);
    }

    #[test]
    fn flags_of_the_other_transport_are_refused() {
        let http = ["--url", "http://127.0.0.1:8080", "--requests", "1"];
        assert!(spec(&[&http[..], &["--method", "GetItem"]].concat()).is_err());
        assert!(spec(&[&http[..], &["--connections", "4"]].concat()).is_err());
        let s = spec(&http).unwrap();
        assert_eq!(s.path, "/api/items/{rand}");
        assert!(spec(&["--grpc", "h:1", "--path", "/x", "--requests", "1"]).is_err());
        assert!(
            Cli::try_parse_from(["labctl", "load", "--requests", "1"]).is_err(),
            "a target is required"
        );
        assert!(
            Cli::try_parse_from([
                "labctl",
                "load",
                "--grpc",
                "h:1",
                "--url",
                "http://h:2",
                "--requests",
                "1"
            ])
            .is_err()
        );
    }

    #[test]
    fn the_long_help_says_what_each_figure_measures() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let load = cmd.find_subcommand_mut("load").unwrap();
        let help = load.render_long_help().to_string();
        for figure in [
            "dropped",
            "p99.9",
            "lag",
            "from when the request was due",
            "deadline_exceeded",
            "served_by",
        ] {
            assert!(help.contains(figure), "--help does not explain {figure:?}");
        }
    }
}
