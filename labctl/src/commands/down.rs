//! `labctl down`: stop the stack recorded in the state dir, whoever started it.

use labctl::launcher;

use crate::cli::DownArgs;

pub async fn run(args: DownArgs) -> anyhow::Result<()> {
    let state_dir = &args.dir.state_dir;
    let stopped = launcher::down(state_dir).await?;
    if stopped.is_empty() {
        println!("nothing running in {}", state_dir.display());
    } else {
        println!("stopped {}", stopped.join(", "));
    }
    Ok(())
}
