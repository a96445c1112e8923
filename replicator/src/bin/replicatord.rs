//! tandem-replicatord: the replication daemon (one per node, every resource).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tandem_common::ClusterConfig;

/// Synchronous block replication daemon (the DRBD role). Usually started by
/// `tandemadm up`; runs in the foreground and logs to stderr.
#[derive(Parser)]
#[command(name = "tandem-replicatord", version)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, default_value = tandem_common::config::DEFAULT_CONFIG_PATH, env = "TANDEM_CONFIG")]
    config: PathBuf,
    /// This node's name in the config (default: the host name).
    #[arg(long, env = "TANDEM_NODE")]
    node: Option<String>,
    /// Resources to bring up at start ("all" for every resource with a disk here).
    #[arg(long = "up", value_name = "RESOURCE")]
    up: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    tandem_common::logging::init("info");
    let args = Args::parse();
    let config = ClusterConfig::load(&args.config)?;
    let node = match args.node {
        Some(n) => n,
        None => hostname().context("cannot determine the host name; pass --node NAME")?,
    };
    config.node(&node)?;
    let mut up = Vec::new();
    for r in args.up {
        if r == "all" {
            up.extend(
                config
                    .resources
                    .iter()
                    .filter(|rc| config.disk_for(rc, &node).is_some())
                    .map(|rc| rc.name.clone()),
            );
        } else {
            up.push(r);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("replicatord")
        .build()?;
    rt.block_on(tandem_replicator::daemon::run(config, node, up))
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}
