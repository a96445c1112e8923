//! `mount.tandem TARGET DIR -o node=NAME[,config=PATH]`: a cluster (`lock_tandem`) mount.
//!
//! Order: fork first (the lock client's runtime threads must not exist across a fork; the
//! parent waits on a pipe and exits with the mount's outcome), connect to this node's
//! tandem-lockd, claim a free journal, take the `meta` glock EX, replay our journal and
//! any unowned dirty one, start the callback and recovery threads, then serve FUSE with no
//! kernel caching that outlives this node's `meta` glock.

use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tandem_common::config::ClusterConfig;
use tandem_fs::cluster::kcache::{FuseInvalidate, KernelCache};
use tandem_fs::cluster::{Cluster, ClusterOptions};
use tandem_fs::fs::Fs;
use tandem_fs::fuse::FuseFs;
use tandem_lockmgr::types::Mode;

use crate::mount::{block_signals, fuse_config, leave_session, open_log, serve, Opts};

pub fn run(mut o: Opts) -> anyhow::Result<()> {
    let config_path = o
        .config
        .clone()
        .unwrap_or_else(|| "/etc/tandem/cluster.toml".to_string());
    let cfg = ClusterConfig::load(config_path.as_ref())?;
    let node = match o.node.clone() {
        Some(n) => n,
        None => default_node(&cfg)?,
    };
    cfg.node(&node)?;
    if o.fs.read_only {
        bail!("read-only cluster mounts are not supported yet; mount read-write");
    }
    // Before any thread exists: every thread inherits the blocked set, so SIGTERM reaches
    // the signal thread (clean unmount) instead of killing a runtime thread's process.
    block_signals();
    let status = if o.foreground {
        None
    } else {
        Some(fork_early()?)
    };
    let dev = crate::target::open_target(&o.target, true)?;
    let sb = tandem_fs::store::read_superblock(&*dev)
        .with_context(|| format!("cannot read the superblock of {}", o.target))?;
    let copts = ClusterOptions {
        socket: cfg.lockd_socket(&node),
        cluster_name: cfg.cluster.name.clone(),
        node_name: node.clone(),
        min_hold: o.min_hold,
        recovery_poll: Duration::from_millis(500),
    };
    let mut cluster =
        Cluster::join(&*dev, &sb, &copts).with_context(|| format!("cannot mount {}", o.target))?;
    // Recovery runs before we wait for `meta`: a dead mount's orphaned `meta` lock is
    // released only by replaying its journal.
    cluster.start(dev.clone(), sb.clone(), copts.recovery_poll)?;
    let glock = cluster.glock.clone();
    let guard = glock.enter(Mode::EX)?;
    cluster.recover_unowned_journals(&*dev, &sb)?;
    let cluster = Arc::new(cluster);
    let (fs, stats) = Fs::mount_cluster(dev, o.fs.clone(), cluster.clone())
        .with_context(|| format!("cannot mount {}", o.target))?;
    drop(guard);
    if !stats.was_clean {
        eprintln!(
            "mount.tandem: {}: replayed {} journal transactions ({} blocks) of journal {}",
            o.target, stats.transactions, stats.blocks, cluster.journal
        );
    }
    o.fs.relatime = false;
    let kcache = Arc::new(KernelCache::default());
    let session = fuser::Session::new(
        FuseFs::new_cluster(fs.clone(), kcache.clone(), cluster.flocks.clone()),
        &o.dir,
        &fuse_config(&o),
    )
    .with_context(|| format!("cannot mount FUSE at {}", o.dir))?;
    // The kernel may cache what `meta` protects only once invalidations can be sent.
    let dev_fuse = session
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate the /dev/fuse descriptor")?;
    kcache.set_notifier(Box::new(FuseInvalidate::new(session.notifier(), dev_fuse)));
    cluster.glock.set_observer(kcache);
    if let Some(fd) = status {
        detach(fd, open_log(&o)?)?;
    }
    let stats_file = cfg.node_run_dir(&node).join(format!(
        "tandemfs-{}.glstats",
        sb.lock_table.replace(':', "_")
    ));
    let reporter = spawn_glstats(cluster.clone(), stats_file.clone());
    tracing::info!(journal = cluster.journal, dir = %o.dir, "cluster mount ready");
    let res = serve(&o, session, &fs);
    reporter.stop();
    let _ = std::fs::remove_file(&stats_file);
    // Give back meta, the iopen locks and the journal explicitly: they are PERSISTENT, and
    // a session that just closed would leave them orphaned for a needless recovery.
    let left = cluster.leave();
    res?;
    left.context("releasing the cluster locks")?;
    Ok(())
}

/// The node whose name is this host's name.
fn default_node(cfg: &ClusterConfig) -> anyhow::Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    match cfg.nodes.iter().find(|n| n.name == host) {
        Some(n) => Ok(n.name.clone()),
        None => bail!("no node named '{host}' (the hostname) in the config: pass -o node=NAME"),
    }
}

/// Forks. The parent waits until the child reports the mount ready ("ok" on the pipe) and
/// exits 0, or exits with the child's status if it fails before that (the child printed
/// why on the shared stderr). The child returns the pipe's write end.
fn fork_early() -> anyhow::Result<OwnedFd> {
    let mut fds = [0; 2];
    // SAFETY: plain pipe/fork/waitpid calls; no other threads exist yet.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            bail!("pipe failed: {}", std::io::Error::last_os_error());
        }
        let (r, w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
        match libc::fork() {
            -1 => bail!("fork failed: {}", std::io::Error::last_os_error()),
            0 => {
                drop(r);
                Ok(w)
            }
            child => {
                drop(w);
                let mut buf = Vec::new();
                let _ = std::fs::File::from(r).read_to_end(&mut buf);
                if buf.starts_with(b"ok") {
                    libc::_exit(0);
                }
                let mut st = 0;
                libc::waitpid(child, &mut st, 0);
                let code = if libc::WIFEXITED(st) {
                    libc::WEXITSTATUS(st)
                } else {
                    32
                };
                libc::_exit(if code == 0 { 32 } else { code });
            }
        }
    }
}

/// The mount exists: leave the caller's session and terminal, then release the parent.
fn detach(status: OwnedFd, log: Option<std::fs::File>) -> anyhow::Result<()> {
    leave_session(log.as_ref().map(std::os::fd::AsRawFd::as_raw_fd));
    let mut f = std::fs::File::from(status);
    f.write_all(b"ok")?;
    Ok(())
}

struct Reporter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes the glock statistics (GFS2's glstats) to a file in the node's run directory
/// every second: `cat /run/tandem/NODE/tandemfs-*.glstats`.
fn spawn_glstats(cluster: Arc<Cluster>, path: PathBuf) -> Reporter {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("glstats".into())
        .spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                let text = tandem_fs::cluster::glstats_text(&cluster);
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, text).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
                for _ in 0..20 {
                    if s2.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .ok();
    Reporter { stop, thread }
}
