//! `tandem-lockctl`: inspect and drive the lock manager through the local `tandem-lockd`.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tandem_common::{ClusterConfig, NodeId};
use tandem_lockmgr::client::{Callback, Client};
use tandem_lockmgr::node::MemberChange;
use tandem_lockmgr::types::{Flags, Mode};
use tokio::io::AsyncBufReadExt;

/// Control tool for tandem-lockd (Tandem's distributed lock manager).
#[derive(Parser, Debug)]
#[command(
    name = "tandem-lockctl",
    version,
    about = "Inspect and drive the Tandem lock manager through the local tandem-lockd"
)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, default_value = tandem_common::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// The local node (whose tandem-lockd to talk to).
    #[arg(long)]
    node: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Members, leader, term, commit index and node health.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Holders and waiters of every resource in a lockspace.
    Locks {
        lockspace: String,
        #[arg(long)]
        json: bool,
    },
    /// Take a lock. With --run, hold it while CMD runs (like flock(1)) and exit with CMD's
    /// status; otherwise print the grant and hold it until stdin reaches end of file or
    /// reads a line "unlock" (locks belong to this process's session).
    Lock {
        lockspace: String,
        resource: String,
        #[arg(long, default_value = "EX")]
        mode: String,
        /// Fail at once instead of waiting.
        #[arg(long)]
        noqueue: bool,
        /// Allowed on resources orphaned by a fenced node (journal recovery).
        #[arg(long)]
        recovery: bool,
        /// Command (and arguments) to run while holding the lock.
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        run: Option<Vec<String>>,
    },
    /// Confirm that a failed node is fenced (powered off or cut from storage).
    FenceAck { node: String },
    /// Report that NODE's journal in LOCKSPACE was replayed: purge its orphaned locks.
    RecoveryDone { node: String, lockspace: String },
    /// Benchmark the cluster through this node (single-client latency, N clients on
    /// distinct resources, 8 clients on one resource) beside the disk's fsync latency.
    Bench {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value = "bench:lockmgr")]
        lockspace: String,
        #[arg(long)]
        json: bool,
    },
    /// Change Raft membership.
    Member {
        #[command(subcommand)]
        change: MemberCmd,
    },
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// Add a node (as a voter, or a learner with --learner).
    Add {
        node: String,
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node.
    Remove { node: String },
}

fn node_id(config: &ClusterConfig, name: &str) -> Result<NodeId> {
    if let Ok(n) = config.node(name) {
        return Ok(n.node_id());
    }
    let id: u8 = name
        .parse()
        .map_err(|_| anyhow!("`{name}` is neither a node name nor a node id"))?;
    Ok(NodeId(id))
}

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`tandem-lockctl status | head`) instead of panicking on EPIPE.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = Args::parse();
    tandem_common::logging::init("warn");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandem-lockctl: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem-lockctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let config = ClusterConfig::load(&args.config)?;
    config.node(&args.node)?;
    let socket = config.lockd_socket(&args.node);
    match args.cmd {
        Cmd::Status { json } => {
            let client = Client::connect_status_only(&socket).await?;
            let s = client.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(ExitCode::SUCCESS);
            }
            let name = |id: NodeId| {
                config
                    .node_by_id(id)
                    .map(|n| n.name.clone())
                    .unwrap_or_else(|| format!("id{id}"))
            };
            let health = if s.leader.is_none() {
                "NO QUORUM: no leader, lock requests wait".to_string()
            } else if s.nodes.iter().any(|n| !n.up && !n.fenced) {
                "DEGRADED: a failed node awaits fence-ack".to_string()
            } else if s.nodes.iter().any(|n| n.orphaned_locks > 0) {
                "RECOVERING: orphaned locks await recovery-done".to_string()
            } else if s.nodes.iter().any(|n| !n.up) {
                "degraded: a node is down".to_string()
            } else {
                "ok".to_string()
            };
            println!("health:       {health}");
            println!("node:         {} (id {})", name(s.id), s.id);
            println!("role:         {}", s.role);
            println!(
                "leader:       {}",
                s.leader.map(name).unwrap_or_else(|| "none".into())
            );
            println!("term:         {}", s.term);
            println!("commit index: {}", s.commit_index);
            println!("applied:      {}", s.applied_index);
            let list = |v: &[NodeId]| v.iter().map(|n| name(*n)).collect::<Vec<_>>().join(" ");
            println!("voters:       {}", list(&s.voters));
            println!("learners:     {}", list(&s.learners));
            println!("sessions:     {}", s.sessions);
            for n in &s.nodes {
                let health = match (n.up, n.fenced, n.orphaned_locks) {
                    (true, _, 0) => "up".to_string(),
                    (true, _, k) => format!("up, {k} orphaned locks awaiting recovery-done"),
                    (false, false, k) => format!("DOWN, not fenced ({k} orphaned locks)"),
                    (false, true, k) => format!("down, fenced ({k} orphaned locks)"),
                };
                println!("  {:<12} {health}", name(n.node));
            }
            for v in s.voters.iter().chain(&s.learners) {
                if !s.nodes.iter().any(|n| n.node == *v) {
                    println!(
                        "  {:<12} not announced yet (daemon never reached the cluster)",
                        name(*v)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Locks { lockspace, json } => {
            let client = Client::connect_status_only(&socket).await?;
            let resources = client.locks(&lockspace).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&resources)?);
                return Ok(ExitCode::SUCCESS);
            }
            for r in resources {
                println!("{}", String::from_utf8_lossy(&r.name).escape_debug());
                for (label, list) in [
                    ("granted", &r.granted),
                    ("converting", &r.converting),
                    ("waiting", &r.waiting),
                ] {
                    for l in list {
                        println!(
                            "  {label:<10} lock {:<6} {:<3} -> {:<3} owner {} token {}{}",
                            l.lock,
                            l.granted.map(|m| m.to_string()).unwrap_or_default(),
                            l.wanted.map(|m| m.to_string()).unwrap_or_default(),
                            l.owner,
                            l.token,
                            if l.orphaned { " ORPHANED" } else { "" }
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lock {
            lockspace,
            resource,
            mode,
            noqueue,
            recovery,
            run,
        } => {
            let mode = Mode::parse(&mode).ok_or_else(|| anyhow!("unknown mode `{mode}`"))?;
            let mut flags = Flags::default();
            if noqueue {
                flags = flags | Flags::NOQUEUE;
            }
            if recovery {
                flags = flags | Flags::RECOVERY;
            }
            let mut client = Client::connect(&socket, "tandem-lockctl").await?;
            let mut callbacks = client.take_callbacks().context("callback stream")?;
            let grant = client
                .lock(&lockspace, resource.as_bytes(), mode, flags)
                .await?;
            match run {
                Some(argv) => {
                    let (prog, rest) = argv.split_first().context("--run needs a command")?;
                    let mut child = tokio::process::Command::new(prog)
                        .args(rest)
                        .env("TANDEM_LOCK_TOKEN", grant.token.to_string())
                        .spawn()
                        .with_context(|| format!("cannot run {prog}"))?;
                    let status = loop {
                        tokio::select! {
                            status = child.wait() => break status?,
                            cb = callbacks.recv() => {
                                if matches!(cb, Some(Callback::Ended(_)) | None) {
                                    // The lock is void: the command must not go on under it.
                                    let _ = child.kill().await;
                                    bail!("lost the lock while the command ran; command killed");
                                }
                            }
                        }
                    };
                    client.unlock(grant.lock, None).await?;
                    Ok(ExitCode::from(
                        status.code().unwrap_or(1).clamp(0, 255) as u8
                    ))
                }
                None => {
                    println!(
                        "granted lock {} mode {} token {}",
                        grant.lock, grant.mode, grant.token
                    );
                    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
                    loop {
                        tokio::select! {
                            line = lines.next_line() => match line? {
                                Some(l) if l.trim() != "unlock" => continue,
                                _ => break,
                            },
                            cb = callbacks.recv() => match cb {
                                Some(Callback::Blocking { wanted, .. }) => {
                                    eprintln!("blocking callback: someone wants {wanted}");
                                }
                                Some(Callback::Ended(reason)) => bail!("lock lost: session ended ({reason:?})"),
                                None => bail!("lock lost: daemon connection closed"),
                            },
                        }
                    }
                    client.unlock(grant.lock, None).await?;
                    println!("unlocked");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Cmd::FenceAck { node } => {
            let id = node_id(&config, &node)?;
            let client = Client::connect(&socket, "tandem-lockctl").await?;
            client.fence_ack(id).await?;
            println!("node {node} confirmed fenced");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RecoveryDone { node, lockspace } => {
            let id = node_id(&config, &node)?;
            let client = Client::connect(&socket, "tandem-lockctl").await?;
            client.recovery_done(id, &lockspace).await?;
            println!("orphaned locks of {node} in {lockspace} purged");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            clients,
            seconds,
            lockspace,
            json,
        } => {
            let state = config.node_state_dir(&args.node).join("lockd");
            let r = tandem_lockmgr::bench::run(
                &socket,
                &state,
                &lockspace,
                clients.max(1),
                std::time::Duration::from_secs(seconds.max(1)),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "disk fdatasync p50:               {} us (preallocated, as the Raft log), {} us appending",
                    r.fsync_p50_us, r.fsync_append_p50_us
                );
                println!(
                    "single client lock+unlock:        p50 {} us, p99 {} us",
                    r.single_p50_us, r.single_p99_us
                );
                println!(
                    "{} clients, distinct resources:   {:.0} lock+unlock pairs/s",
                    r.parallel_clients, r.parallel_pairs_per_s
                );
                println!(
                    "{} clients, one resource:          {:.0} hand-offs/s",
                    r.contended_clients, r.contended_handoffs_per_s
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Member { change } => {
            let client = Client::connect(&socket, "tandem-lockctl").await?;
            let change = match change {
                MemberCmd::Add { node, learner } => {
                    let id = node_id(&config, &node)?;
                    if learner {
                        MemberChange::AddLearner(id)
                    } else {
                        MemberChange::AddVoter(id)
                    }
                }
                MemberCmd::Remove { node } => MemberChange::Remove(node_id(&config, &node)?),
            };
            client.member(change).await?;
            println!("membership change committed");
            Ok(ExitCode::SUCCESS)
        }
    }
}
