//! tandemadm: the replication admin tool (DRBD's drbdadm), for one node of the cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tandem_common::size::format_bytes;
use tandem_common::ClusterConfig;
use tandem_replicator::control::{self, Request, Response};
use tandem_replicator::engine::ResourceStatus;
use tandem_replicator::meta;
use tandem_replicator::state::ConnState;

#[derive(Parser)]
#[command(
    name = "tandemadm",
    version,
    about = "Administer Tandem replicated volumes (like drbdadm)"
)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, global = true, default_value = tandem_common::config::DEFAULT_CONFIG_PATH, env = "TANDEM_CONFIG")]
    config: PathBuf,
    /// Which node this command acts on (default: the host name).
    #[arg(long, global = true, env = "TANDEM_NODE")]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write fresh metadata (creates a missing file-backed disk from resource.size).
    CreateMd {
        resource: String,
        /// Overwrite existing metadata.
        #[arg(long)]
        force: bool,
    },
    /// Print the metadata superblock.
    DumpMd { resource: String },
    /// Erase the metadata (the data stays; the disk is no longer a Tandem volume).
    WipeMd {
        resource: String,
        #[arg(long)]
        force: bool,
    },
    /// Attach the disk, connect to peers and export NBD (starts the daemon if needed).
    Up { resource: String },
    /// Demote, disconnect and detach.
    Down { resource: String },
    /// Promote to Primary (`--force` declares local data good and starts a full sync).
    Primary {
        resource: String,
        #[arg(long)]
        force: bool,
    },
    /// Demote to Secondary.
    Secondary { resource: String },
    /// Reconnect a StandAlone resource.
    Connect {
        resource: String,
        /// Become sync target and discard local changes (split-brain victim).
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Disconnect from peers and stay StandAlone.
    Disconnect { resource: String },
    /// Show roles, connection, replication and disk states.
    Status {
        resource: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print state changes, one line each (drbdsetup events2 shape).
    Events {
        resource: Option<String>,
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
    },
    /// Print the resolved configuration of this node.
    Dump { resource: Option<String> },
    /// Start a new data generation; with --clear-bitmap on fresh disks, skip the initial sync.
    NewCurrentUuid {
        resource: String,
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Online verify against every connected peer: compare block checksums, report and
    /// mark differing blocks out of sync (repair with invalidate / invalidate-remote).
    Verify {
        resource: String,
        /// Start it and return without waiting for the result.
        #[arg(long)]
        no_wait: bool,
    },
    /// This node's data is bad: become Inconsistent and resync it from a connected
    /// UpToDate peer. A Primary keeps serving I/O meanwhile (through that peer).
    Invalidate { resource: String },
    /// The peers' data is bad: resync them from here (only verify's findings, if any).
    InvalidateRemote { resource: String },
    /// Mark this disconnected Secondary's data Outdated.
    Outdate { resource: String },
    /// Fault drill: make this node's backing disk fail every request with EIO (until the
    /// daemon restarts), to see on-io-error in action.
    InjectFault {
        resource: String,
        /// Fail every disk request with EIO.
        #[arg(long, required = true)]
        disk_eio: bool,
    },
    /// Wait until every peer of a resource is Established and UpToDate.
    WaitSync {
        resource: String,
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
}

struct Ctx {
    config: ClusterConfig,
    config_path: PathBuf,
    node: String,
}

fn main() {
    tandem_common::logging::init("warn");
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("tandemadm: {e:#}");
        std::process::exit(1);
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&args.config)?;
    let node = match args.node {
        Some(n) => n,
        None => hostname().context("cannot determine the host name; pass --node NAME")?,
    };
    config.node(&node)?;
    let ctx = Ctx {
        config,
        config_path: args.config,
        node,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.cmd {
        Cmd::CreateMd { resource, force } => each(&ctx, &resource, |r| {
            let rc = ctx.config.resource(r)?;
            let sb = meta::create(&ctx.config, rc, &ctx.node, force)?;
            println!(
                "{r}: metadata created ({} usable, state {}); next: `tandemadm up {r}`",
                format_bytes(sb.usable_size_bytes),
                sb.disk_state
            );
            Ok(())
        }),
        Cmd::DumpMd { resource } => {
            let rc = ctx.config.resource(&resource)?;
            let (store, sb) = meta::open(&ctx.config, rc, &ctx.node)?;
            println!(
                "# metadata of {resource} on {} at {}",
                ctx.node,
                store.path().display()
            );
            println!("version {}", meta::format::MD_VERSION);
            println!("node-id {}", sb.node_id);
            println!("disk-state {}", sb.disk_state);
            println!("size-bytes {}", sb.usable_size_bytes);
            println!("current-uuid {:016X}", sb.current_uuid);
            println!(
                "history-uuids {:016X} {:016X}",
                sb.history_uuids[0], sb.history_uuids[1]
            );
            println!(
                "flags {:#x} (consistent=1 was-primary=2 crashed-primary=4 lost-quorum=8 crashed-here=16)",
                sb.flags
            );
            for p in &sb.peers {
                println!("peer {} bitmap-uuid {:016X}", p.node_id, p.bitmap_uuid);
            }
            println!("md-offset {} seq {}", sb.md_offset, sb.seq);
            Ok(())
        }
        Cmd::WipeMd { resource, force } => {
            if !force {
                bail!("wipe-md erases the metadata of {resource}; repeat with --force to confirm");
            }
            let rc = ctx.config.resource(&resource)?;
            let (store, _) = meta::open(&ctx.config, rc, &ctx.node)?;
            store.wipe()?;
            println!("{resource}: metadata wiped");
            Ok(())
        }
        Cmd::Up { resource } => rt.block_on(async {
            ensure_daemon(&ctx).await?;
            each_async(&ctx, &resource, |r| Request::Up { resource: r }).await
        }),
        Cmd::Down { resource } => rt.block_on(each_async(&ctx, &resource, |r| Request::Down {
            resource: r,
        })),
        Cmd::Primary { resource, force } => rt.block_on(each_async(&ctx, &resource, |r| {
            Request::Primary { resource: r, force }
        })),
        Cmd::Secondary { resource } => rt.block_on(each_async(&ctx, &resource, |r| {
            Request::Secondary { resource: r }
        })),
        Cmd::Connect {
            resource,
            discard_my_data,
        } => rt.block_on(each_async(&ctx, &resource, |r| Request::Connect {
            resource: r,
            discard_my_data,
        })),
        Cmd::Disconnect { resource } => rt.block_on(each_async(&ctx, &resource, |r| {
            Request::Disconnect { resource: r }
        })),
        Cmd::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => rt.block_on(each_async(&ctx, &resource, |r| Request::NewCurrentUuid {
            resource: r,
            clear_bitmap,
        })),
        Cmd::Status { resource, json } => rt.block_on(async {
            let list = status(&ctx, resource.filter(|r| r != "all")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for st in &list {
                    print!("{}", render_status(st));
                }
            }
            Ok(())
        }),
        Cmd::Events { resource, now } => rt.block_on(async {
            let sock = ctx.config.replicator_control_socket(&ctx.node);
            let (mut s, mut resp) = control::call(&sock, &Request::Events { resource, now })
                .await
                .map_err(|e| not_running(&ctx, e))?;
            loop {
                match resp {
                    Response::Event(line) => println!("{line}"),
                    Response::End => return Ok(()),
                    Response::Error { message } => bail!(message),
                    _ => {}
                }
                resp = match control::next(&mut s).await {
                    Ok(r) => r,
                    Err(_) => return Ok(()),
                };
            }
        }),
        Cmd::Dump { resource } => {
            let mut c = ctx.config.clone();
            if let Some(r) = resource {
                c.resources.retain(|rc| rc.name == r);
                if c.resources.is_empty() {
                    bail!(
                        "resource {r} is not defined in {}",
                        ctx.config_path.display()
                    );
                }
            }
            for rc in &mut c.resources {
                if rc.secret.is_some() {
                    rc.secret = Some("<hidden>".into());
                }
            }
            if c.cluster.secret.is_some() {
                c.cluster.secret = Some("<hidden>".into());
            }
            println!("# resolved configuration for node {}", ctx.node);
            print!("{}", toml::to_string_pretty(&c)?);
            Ok(())
        }
        Cmd::Verify { resource, no_wait } => rt.block_on(async {
            each_async(&ctx, &resource, |r| Request::Verify { resource: r }).await?;
            if no_wait {
                return Ok(());
            }
            let mut last_pct = -1.0;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let list = status(&ctx, Some(resource.clone())).await?;
                let running: Vec<_> = list[0].connections.iter().filter_map(|c| c.verify.as_ref()).collect();
                if running.is_empty() {
                    for c in &list[0].connections {
                        if let Some(n) = c.last_verify_out_of_sync_blocks {
                            println!(
                                "{resource}: verify with {} done: {n} block(s) out of sync ({}){}",
                                c.name,
                                format_bytes(n * 4096),
                                if n > 0 { "; repair: `tandemadm invalidate-remote` here, or `tandemadm invalidate` on the peer" } else { "" }
                            );
                        }
                    }
                    return Ok(());
                }
                let pct = running.iter().map(|v| v.percent_done).fold(100.0, f64::min);
                if pct - last_pct >= 10.0 {
                    let eta = running.iter().filter_map(|v| v.eta_s).max();
                    println!("{resource}: verify {pct:.1}% done{}", eta.map(|e| format!(", eta {e}s")).unwrap_or_default());
                    last_pct = pct;
                }
            }
        }),
        Cmd::Invalidate { resource } => rt.block_on(each_async(&ctx, &resource, |r| Request::Invalidate { resource: r })),
        Cmd::InvalidateRemote { resource } => {
            rt.block_on(each_async(&ctx, &resource, |r| Request::InvalidateRemote { resource: r }))
        }
        Cmd::Outdate { resource } => rt.block_on(each_async(&ctx, &resource, |r| Request::Outdate { resource: r })),
        Cmd::InjectFault { resource, disk_eio: _ } => {
            rt.block_on(each_async(&ctx, &resource, |r| Request::InjectDiskEio { resource: r }))
        }
        Cmd::WaitSync {
            resource,
            timeout_s,
        } => rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(timeout_s);
            loop {
                let list = status(&ctx, Some(resource.clone())).await?;
                use tandem_replicator::state::{DiskState, ReplState};
                // A diskless tiebreaker is in sync when it is Diskless and connected.
                let good = |disk: DiskState, client: bool| {
                    disk == DiskState::UpToDate || (client && disk == DiskState::Diskless)
                };
                let done = list.iter().all(|st| {
                    good(st.disk_state, st.client)
                        && st.connections.iter().all(|c| {
                            c.replication_state == ReplState::Established
                                && good(c.peer_disk_state, c.peer_client)
                        })
                });
                if done {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    for st in &list {
                        eprint!("{}", render_status(st));
                    }
                    bail!("{resource} not in sync after {timeout_s}s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }),
    }
}

fn each(
    ctx: &Ctx,
    resource: &str,
    mut f: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for r in names(ctx, resource)? {
        f(&r)?;
    }
    Ok(())
}

fn names(ctx: &Ctx, resource: &str) -> anyhow::Result<Vec<String>> {
    if resource == "all" {
        Ok(ctx
            .config
            .resources
            .iter()
            .filter(|rc| ctx.config.disk_for(rc, &ctx.node).is_some())
            .map(|rc| rc.name.clone())
            .collect())
    } else {
        ctx.config.resource(resource)?;
        Ok(vec![resource.to_string()])
    }
}

fn not_running(ctx: &Ctx, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "tandem-replicatord for node {} is not running ({}): start it with `tandemadm --node {} up RESOURCE`",
        ctx.node,
        e,
        ctx.node
    )
}

async fn each_async(
    ctx: &Ctx,
    resource: &str,
    make: impl Fn(String) -> Request,
) -> anyhow::Result<()> {
    let sock = ctx.config.replicator_control_socket(&ctx.node);
    let mut failed = false;
    for r in names(ctx, resource)? {
        let (_, resp) = control::call(&sock, &make(r))
            .await
            .map_err(|e| not_running(ctx, e))?;
        match resp {
            Response::Ok { message } => println!("{message}"),
            Response::Error { message } => {
                eprintln!("tandemadm: {message}");
                failed = true;
            }
            other => eprintln!("tandemadm: unexpected reply {other:?}"),
        }
    }
    if failed {
        std::process::exit(11);
    }
    Ok(())
}

async fn status(ctx: &Ctx, resource: Option<String>) -> anyhow::Result<Vec<ResourceStatus>> {
    let sock = ctx.config.replicator_control_socket(&ctx.node);
    let (_, resp) = control::call(&sock, &Request::Status { resource })
        .await
        .map_err(|e| not_running(ctx, e))?;
    match resp {
        Response::Status(list) => Ok(list),
        Response::Error { message } => bail!(message),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// DRBD-style text status.
fn render_status(st: &ResourceStatus) -> String {
    let mut out = format!("{} role:{}\n  disk:{}", st.name, st.role, st.disk_state);
    if st.client {
        out += " client:yes";
    }
    if !st.quorum {
        out += " quorum:no";
    }
    out += "\n";
    for c in &st.connections {
        if c.connection_state != ConnState::Connected {
            out += &format!("  {} connection:{}", c.name, c.connection_state);
            if let Some(e) = &c.last_error {
                out += &format!(" ({e})");
            }
            out += "\n";
            continue;
        }
        out += &format!("  {} role:{}\n", c.name, c.peer_role);
        out += "    ";
        if c.replication_state != tandem_replicator::state::ReplState::Established {
            out += &format!("replication:{} ", c.replication_state);
        }
        out += &format!("peer-disk:{}", c.peer_disk_state);
        if c.peer_client {
            out += " peer-client:yes";
        }
        if c.tiebreaker_vote == Some(false) {
            out += " tiebreaker-vote:no";
        }
        if let Some(s) = &c.sync {
            out += &format!(
                " done:{:.1} speed:{}/s eta:{}",
                s.percent_done,
                format_bytes(s.speed_bytes_per_s),
                s.eta_s
                    .map(|e| format!("{e}s"))
                    .unwrap_or_else(|| "?".into())
            );
        }
        out += "\n";
    }
    out
}

/// Starts tandem-replicatord for this node in the background if its socket is silent.
async fn ensure_daemon(ctx: &Ctx) -> anyhow::Result<()> {
    let sock = ctx.config.replicator_control_socket(&ctx.node);
    if control::call(&sock, &Request::Ping).await.is_ok() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let daemon = exe.with_file_name("tandem-replicatord");
    if !daemon.exists() {
        bail!("{} not found next to tandemadm", daemon.display());
    }
    let state = ctx.config.node_state_dir(&ctx.node);
    std::fs::create_dir_all(&state)?;
    let log_path = state.join("replicatord.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    use std::os::unix::process::CommandExt;
    Command::new(&daemon)
        .arg("--config")
        .arg(&ctx.config_path)
        .arg("--node")
        .arg(&ctx.node)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", daemon.display()))?;
    wait_for_socket(&sock, &log_path).await
}

async fn wait_for_socket(sock: &Path, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if control::call(sock, &Request::Ping).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("tandem-replicatord did not start; see {}", log.display())
}
