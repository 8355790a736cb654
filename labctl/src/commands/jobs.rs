//! `labctl jobs`: feed the running stack's job table at a steady rate.

use labctl::{
    jobs::{self, JobSpec},
    launcher::Stack,
};

use crate::cli::JobsArgs;

pub async fn run(args: JobsArgs) -> anyhow::Result<()> {
    let mysql_url = match args.mysql_url {
        Some(url) => url,
        None => Stack::attach(&args.dir.state_dir)?.config.mysql.url.clone(),
    };
    let spec = JobSpec {
        mysql_url,
        rate: args.rate,
        duration: args.duration,
        poison_ratio: args.poison_ratio,
        payload_bytes: args.payload_bytes,
        seed: args.seed,
    };
    eprintln!(
        "inserting {} jobs/s for {:?} into {} …",
        spec.rate,
        spec.duration,
        lab_common::config::redacted_url(&spec.mysql_url)
    );
    let report = jobs::produce(&spec).await?;
    println!(
        "inserted {} jobs ({} poison)",
        report.inserted, report.poison
    );
    Ok(())
}
