//! `tandem-lockd`: the lock-manager daemon of one node (see docs/LOCKMGR.md).

use clap::Parser;
use std::path::PathBuf;
use tandem_lockmgr::daemon::{run, Options};

/// Tandem's Raft-replicated distributed lock manager daemon.
#[derive(Parser, Debug)]
#[command(
    name = "tandem-lockd",
    version,
    about = "Tandem lock-manager daemon: one per node, a Raft-replicated DLM"
)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, default_value = tandem_common::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// This node's name in the configuration.
    #[arg(long)]
    node: String,
    /// Start with an empty log and wait to be added with `tandem-lockctl member add`
    /// (for a node whose state directory was wiped).
    #[arg(long)]
    join: bool,
    /// Snapshot the lock table and compact the Raft log every this many applied entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tandem_common::logging::init("info");
    run(Options {
        config: args.config,
        node: args.node,
        join: args.join,
        snapshot_every_entries: args.snapshot_every,
    })?;
    Ok(())
}
