//! `labctl scale backends N`: grow or shrink the running stack's Bs.

use labctl::launcher::Stack;

use crate::cli::ScaleBackendsArgs;

pub async fn backends(args: ScaleBackendsArgs) -> anyhow::Result<()> {
    let n = args.n;
    let mut stack = Stack::attach(&args.dir.state_dir)?;
    let changed = stack.scale_backends(n).await?;
    if changed.is_empty() {
        println!("already {n} backends");
    } else {
        println!("now {n} backends (changed: {})", changed.join(", "));
    }
    Ok(())
}
