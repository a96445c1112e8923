//! `mount.tandem TARGET DIR [-o OPTS] [-f]`: serves a Tandem filesystem over FUSE.
//!
//! Called directly or by mount(8) for `mount -t tandem`. Replays the journal, mounts, and
//! (unless `-f`) daemonizes once the mount is in place, so errors reach the caller's exit
//! code. SIGTERM, SIGINT and `umount DIR` all end in a clean unmount (journal checkpointed,
//! clean flag set).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fuser::{Config, MountOption, SessionACL};
use tandem_fs::fs::{Fs, FsOptions};
use tandem_fs::fuse::FuseFs;

use crate::readahead;

pub(crate) struct Opts {
    pub(crate) target: String,
    pub(crate) dir: String,
    pub(crate) foreground: bool,
    pub(crate) fs: FsOptions,
    pub(crate) allow_other: bool,
    /// Kernel mount flags passed through (nodev, nosuid, noexec, sync, ...).
    pub(crate) flags: Vec<MountOption>,
    pub(crate) ttl: Duration,
    pub(crate) commit: Duration,
    pub(crate) threads: usize,
    /// Where a daemonized mount's log goes (default: nowhere).
    pub(crate) logfile: Option<String>,
    /// Cluster mount (`lock_tandem`): this node's name in cluster.toml.
    pub(crate) node: Option<String>,
    /// Cluster mount: cluster.toml (default /etc/tandem/cluster.toml).
    pub(crate) config: Option<String>,
    /// Cluster mount: minimum time a glock is kept before another node gets it.
    pub(crate) min_hold: Duration,
}

const USAGE: &str = "usage: mount.tandem TARGET DIR [-f] [-o OPTIONS]
options: ro, rw, noatime, relatime, allow_other, acl, noacl, journal=N, attr_timeout=SECS,
         commit=SECS, threads=N, logfile=PATH, lockproto=lock_nolock, plus mount(8)
         generic options
cluster (lock_tandem) mounts: node=NAME [config=/etc/tandem/cluster.toml]
         [min_hold_ms=MS]: locks through this node's tandem-lockd, claims a free journal";

fn parse(args: Vec<String>) -> anyhow::Result<Opts> {
    let mut pos = Vec::new();
    let mut o = Opts {
        target: String::new(),
        dir: String::new(),
        foreground: false,
        fs: FsOptions::default(),
        allow_other: false,
        flags: Vec::new(),
        // One daemon owns the filesystem and the kernel invalidates what it changes itself,
        // so long kernel caching is safe on a single node (the cluster mount will
        // invalidate through FUSE notifications when it loses a glock).
        ttl: Duration::from_secs(60),
        commit: Duration::from_secs(1),
        threads: 2,
        logfile: None,
        node: None,
        config: None,
        min_hold: Duration::from_millis(5),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "-f" => o.foreground = true,
            // mount(8) passes these; they do not change what we do.
            "-n" | "-s" | "-v" => {}
            "-o" => {
                let list = it.next().context("-o needs an argument")?;
                for opt in list.split(',').filter(|s| !s.is_empty()) {
                    apply_opt(&mut o, opt)?;
                }
            }
            s if s.starts_with('-') => bail!("unknown flag {s}\n{USAGE}"),
            _ => pos.push(a),
        }
    }
    let [target, dir]: [String; 2] = pos.try_into().map_err(|_| anyhow::anyhow!("{USAGE}"))?;
    o.target = target;
    // Absolute (lexically): the daemon leaves the working directory when it detaches, and
    // the mount is then found by this path (see `readahead`).
    o.dir = readahead::absolute(&dir).to_string_lossy().into_owned();
    Ok(o)
}

fn secs(v: &str) -> anyhow::Result<Duration> {
    Ok(Duration::from_secs_f64(
        v.parse::<f64>()
            .with_context(|| format!("bad seconds {v:?}"))?,
    ))
}

fn apply_opt(o: &mut Opts, opt: &str) -> anyhow::Result<()> {
    let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
    match k {
        "ro" => o.fs.read_only = true,
        "rw" => o.fs.read_only = false,
        "noatime" => o.fs.relatime = false,
        "relatime" | "atime" | "strictatime" => o.fs.relatime = true,
        "allow_other" => o.allow_other = true,
        "acl" => o.fs.posix_acl = true,
        "noacl" => o.fs.posix_acl = false,
        "journal" | "jid" => o.fs.journal = v.parse().context("journal=N needs a number")?,
        "attr_timeout" | "entry_timeout" => o.ttl = secs(v)?,
        "commit" => o.commit = secs(v)?.max(Duration::from_millis(10)),
        "logfile" if !v.is_empty() => o.logfile = Some(v.to_string()),
        "threads" => {
            o.threads = v
                .parse::<usize>()
                .context("threads=N needs a number")?
                .clamp(1, 64)
        }
        "node" if !v.is_empty() => o.node = Some(v.to_string()),
        "config" if !v.is_empty() => o.config = Some(v.to_string()),
        "min_hold_ms" => {
            o.min_hold = Duration::from_millis(v.parse().context("min_hold_ms=MS needs a number")?)
        }
        "lockproto" if v == "lock_nolock" => o.fs.allow_cluster_fs_without_locking = true,
        "lockproto" => bail!("lockproto={v}: only lock_nolock can be forced"),
        "defaults"
        | "auto"
        | "noauto"
        | "user"
        | "nouser"
        | "users"
        | "_netdev"
        | "nofail"
        | "async"
        | "default_permissions" => {}
        // Kernel mount flags: honoured, not ignored (noexec and nosuid matter for security).
        "dev" => o.flags.push(MountOption::Dev),
        "nodev" => o.flags.push(MountOption::NoDev),
        "suid" => o.flags.push(MountOption::Suid),
        "nosuid" => o.flags.push(MountOption::NoSuid),
        "exec" => o.flags.push(MountOption::Exec),
        "noexec" => o.flags.push(MountOption::NoExec),
        "sync" => o.flags.push(MountOption::Sync),
        "dirsync" => o.flags.push(MountOption::DirSync),
        _ if k.starts_with("x-") || k.starts_with("comment") => {}
        _ => bail!("unknown mount option {opt:?}"),
    }
    Ok(())
}

pub(crate) fn conflicts(a: &MountOption, b: &MountOption) -> bool {
    use MountOption::*;
    matches!(
        (a, b),
        (Dev, NoDev)
            | (NoDev, Dev)
            | (Suid, NoSuid)
            | (NoSuid, Suid)
            | (Exec, NoExec)
            | (NoExec, Exec)
    ) || a == b
}

pub(crate) fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local, fully initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn run(o: Opts) -> anyhow::Result<()> {
    if o.node.is_some() || o.config.is_some() {
        return crate::mount_cluster::run(o);
    }
    let dev = crate::target::open_target(&o.target, !o.fs.read_only)?;
    let (fs, stats) =
        Fs::mount(dev, o.fs.clone()).with_context(|| format!("cannot mount {}", o.target))?;
    if !stats.was_clean {
        eprintln!(
            "mount.tandem: {}: replayed {} journal transactions ({} blocks)",
            o.target, stats.transactions, stats.blocks
        );
    }
    let fs = Arc::new(fs);
    let session = fuser::Session::new(FuseFs::new(fs.clone(), o.ttl), &o.dir, &fuse_config(&o))
        .with_context(|| format!("cannot mount FUSE at {}", o.dir))?;
    if !o.foreground {
        daemonize(open_log(&o)?.as_ref().map(std::os::fd::AsRawFd::as_raw_fd))?;
    }
    serve(&o, session, &fs)
}

/// Runs the FUSE session until unmount, with the signal thread (clean unmount on
/// SIGTERM/SIGINT/SIGHUP) and the group-commit thread; then shuts the filesystem down.
pub(crate) fn serve(
    o: &Opts,
    mut session: fuser::Session<FuseFs>,
    fs: &Arc<Fs>,
) -> anyhow::Result<()> {
    let sigs = block_signals();
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `sigs` is a valid set blocked in every thread, so sigwait is well-defined.
            unsafe { libc::sigwait(&sigs, &mut sig) };
            tracing::info!(sig, "signal received, unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::error!(error = %e, "unmount on signal failed");
            }
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let committer = {
        let (fs, stop, every) = (fs.clone(), stop.clone(), o.commit);
        std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    // Short naps so unmount does not wait a whole interval for this thread;
                    // operations wake it early when the running transaction grows big.
                    let kicked = fs.wait_for_commit_kick(every.min(Duration::from_millis(50)));
                    if !kicked && last.elapsed() < every {
                        continue;
                    }
                    last = std::time::Instant::now();
                    // Group commit: one journal transaction for everything since the last one.
                    if let Err(e) = fs.commit() {
                        tracing::error!(error = %e, "periodic journal commit failed");
                    }
                }
            })?
    };
    readahead::raise(&o.dir, tandem_fs::fuse::MAX_WRITE_BYTES >> 10);
    let res = session.run();
    stop.store(true, Ordering::Relaxed);
    let _ = committer.join();
    fs.shutdown()
        .context("clean shutdown failed; the journal will be replayed at next mount")?;
    res.context("FUSE session failed")?;
    Ok(())
}

pub(crate) fn fuse_config(o: &Opts) -> Config {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(o.target.clone()),
        MountOption::Subtype("tandem".into()),
        MountOption::DefaultPermissions,
        if o.fs.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    if !o.fs.relatime {
        cfg.mount_options.push(MountOption::NoAtime);
    }
    for f in &o.flags {
        // The last of a conflicting pair wins, as with mount(8).
        cfg.mount_options.retain(|m| !conflicts(m, f));
        cfg.mount_options.push(f.clone());
    }
    if o.allow_other {
        cfg.acl = SessionACL::All;
    }
    cfg.n_threads = Some(o.threads);
    cfg
}

pub(crate) fn open_log(o: &Opts) -> anyhow::Result<Option<std::fs::File>> {
    o.logfile
        .as_ref()
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open log file {p}"))
        })
        .transpose()
}

/// Forks; the parent exits 0 (the mount already exists), the child carries on detached.
fn daemonize(log_fd: Option<i32>) -> anyhow::Result<()> {
    // SAFETY: no other threads exist yet (the FUSE session has not started), so fork is
    // safe; the parent leaves through _exit so it does not run the mount's destructors.
    unsafe {
        match libc::fork() {
            -1 => bail!("fork failed: {}", std::io::Error::last_os_error()),
            0 => {}
            _ => libc::_exit(0),
        }
    }
    leave_session(log_fd);
    Ok(())
}

/// A daemon's last step out of the caller's session: new session, stdio on /dev/null
/// (stderr, where tracing writes, on the log file if there is one), cwd `/`.
pub(crate) fn leave_session(log_fd: Option<i32>) {
    // SAFETY: only fd manipulation on descriptors this process owns.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        if let Some(fd) = log_fd {
            libc::dup2(fd, 2);
        }
        let _ = libc::chdir(c"/".as_ptr());
    }
}

pub fn main(args: Vec<String>) -> ExitCode {
    let o = match parse(args.into_iter().skip(1).collect()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mount.tandem: {e:#}");
            return ExitCode::from(1);
        }
    };
    match run(o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount.tandem: {e:#}");
            // mount(8) convention: 32 = mount failure.
            ExitCode::from(32)
        }
    }
}
