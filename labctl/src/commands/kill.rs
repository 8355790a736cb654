//! `labctl kill`: send one signal to one process of the running stack.

use labctl::launcher::Stack;

use crate::cli::KillArgs;

pub fn run(args: KillArgs) -> anyhow::Result<()> {
    let KillArgs { name, signal, dir } = args;
    let stack = Stack::attach(&dir.state_dir)?;
    stack.signal(&name, signal)?;
    let pid = stack.service(&name)?.pid;
    println!("sent {signal} to {name} (pid {pid})");
    Ok(())
}
