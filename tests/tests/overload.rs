//! Overload (issue 9): clients that send as fast as they can and never read a reply.
//! The daemons must push back (stop reading, or drop the offender) and keep serving
//! everyone else, with their resident memory under the bounds documented in
//! docs/TESTING.md ("Overload") — never grow until the kernel's OOM killer steps in.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_common::frame::{self, Channel};
use tandem_lockmgr::proto::{ClientReply, ClientRequest, CLIENT_PROTOCOL_MAX};
use tandem_lockmgr::table::LockError;
use tandem_lockmgr::types::{Flags, Mode, ReqId};
use tandem_tests::Cluster;

/// The floods are meant to saturate the machine: one at a time, or each would measure
/// the other (cargo runs a binary's tests two at once).
static ONE_FLOOD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Resident memory of a process, KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Peak-RSS watchers of some daemons (one per node), started before a flood: each samples
/// its daemon's RSS every 100 ms until the flood's `stop` is set.
struct RssWatch {
    what: &'static str,
    before_kib: Vec<(usize, u64)>,
    peaks: Vec<std::thread::JoinHandle<u64>>,
}

impl RssWatch {
    /// `daemons`: (node index, PID).
    fn start(what: &'static str, daemons: &[(usize, u32)], stop: &Arc<AtomicBool>) -> Self {
        let before_kib = daemons.iter().map(|&(n, pid)| (n, rss_kib(pid))).collect();
        let peaks = daemons
            .iter()
            .map(|&(_, pid)| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut peak = 0;
                    while !stop.load(Ordering::Relaxed) {
                        peak = peak.max(rss_kib(pid));
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    peak
                })
            })
            .collect();
        Self {
            what,
            before_kib,
            peaks,
        }
    }

    /// Once `stop` is set: prints before and peak of each daemon and asserts every peak
    /// stayed under `bound_mib`.
    fn check(self, bound_mib: u64) {
        for ((node, before), peak) in self.before_kib.into_iter().zip(self.peaks) {
            let peak_mib = peak.join().unwrap() / 1024;
            eprintln!(
                "{} n{} RSS before {} MiB, peak {peak_mib} MiB",
                self.what,
                node + 1,
                before / 1024
            );
            assert!(
                peak_mib < bound_mib,
                "{} n{} grew to {peak_mib} MiB (bound {bound_mib} MiB)",
                self.what,
                node + 1
            );
        }
    }
}

/// A client on node `node` that takes and releases a lock: how long it took, or its error.
fn timed_lock(c: &Cluster, node: usize, res: &str) -> Result<Duration, String> {
    let t = Instant::now();
    let out = c
        .lockctl(node, &["lock", "test:fs", res, "--run", "true"])
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(t.elapsed())
}

/// Bound on tandem-lockd's RSS under the flood (docs/TESTING.md).
const LOCKD_RSS_BOUND_MIB: u64 = 128;

#[test]
fn lock_request_flood_is_pushed_back_and_lockd_memory_stays_bounded() {
    let _serial = serial();
    let mut c = Cluster::builder().nodes(3).start().unwrap();
    let mut pids = Vec::new();
    for i in 0..3 {
        pids.push(c.start_lockd(i).unwrap());
    }
    c.wait_for(Duration::from_secs(30), || {
        Ok((0..3).all(|i| {
            c.lockctl_status(i)
                .is_some_and(|s| s["leader"].as_u64().unwrap_or(0) != 0)
        }))
    })
    .unwrap();
    timed_lock(&c, 0, "warm-up").unwrap();
    let config = tandem_common::config::ClusterConfig::load(c.config_path(0)).unwrap();
    let socket = config.lockd_socket(&c.node_name(0));

    // Flooders: lock requests on ever new resources plus status requests, as fast as the
    // socket takes them, never reading a reply.
    let stop = Arc::new(AtomicBool::new(false));
    // Two never read a reply; two read them all (so their locks keep coming, until the
    // per-session limit refuses more).
    let flooders: Vec<_> = (0..4)
        .map(|f| {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || flood_locks(&socket, f, f >= 2, &stop))
        })
        .collect();
    let rss = RssWatch::start("lockd", &[(0, pids[0])], &stop);
    let mut slowest = Duration::ZERO;
    let mut failures = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(12) {
        match timed_lock(&c, 0, "well-behaved") {
            Ok(d) => slowest = slowest.max(d),
            Err(e) => failures.push(e),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<String> = flooders.into_iter().map(|f| f.join().unwrap()).collect();
    eprintln!("slowest well-behaved lock {slowest:?}");
    for r in &reports {
        eprintln!("  {r}");
    }
    assert!(c.alive(0, "lockd"), "lockd died under the flood");
    assert!(
        failures.is_empty(),
        "well-behaved clients failed: {failures:?}"
    );
    rss.check(LOCKD_RSS_BOUND_MIB);
    assert!(
        slowest < Duration::from_secs(10),
        "a well-behaved client waited {slowest:?}"
    );
    // Everything still works afterwards, on every node.
    for i in 0..3 {
        timed_lock(&c, i, "after-the-flood").unwrap();
    }
}

/// Floods lockd's client socket until `stop`; returns a one-line report.
fn flood_locks(socket: &std::path::Path, f: usize, reads: bool, stop: &AtomicBool) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    let reader = reads.then(|| {
        let mut r = s.try_clone().unwrap();
        std::thread::spawn(move || read_replies(&mut r))
    });
    let hello = ClientRequest::Hello {
        min_version: 1,
        max_version: CLIENT_PROTOCOL_MAX,
        client: format!("flood-{f}"),
        open_session: true,
    };
    s.write_all(&frame::encode(Channel::LockClient, &hello).unwrap())
        .unwrap();
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (mut sent, mut stalls) = (0u64, 0u64);
    let mut batch = Vec::new();
    let end = loop {
        if stop.load(Ordering::Relaxed) {
            break "stopped".to_string();
        }
        batch.clear();
        for _ in 0..256 {
            sent += 1;
            let req = if sent % 16 == 0 {
                ClientRequest::Status { req: ReqId(sent) }
            } else {
                ClientRequest::Lock {
                    req: ReqId(sent),
                    lockspace: "test:flood".into(),
                    resource: format!("flood-{f}-{sent}").into_bytes(),
                    mode: Mode::NL,
                    flags: Flags(0),
                }
            };
            batch.extend(frame::encode(Channel::LockClient, &req).unwrap());
        }
        let mut off = 0;
        while off < batch.len() && !stop.load(Ordering::Relaxed) {
            match s.write(&batch[off..]) {
                Ok(n) => off += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    stalls += 1
                }
                Err(e) => {
                    return format!(
                        "flood-{f}: {sent} requests queued, {stalls} write stalls, then {e}"
                    )
                }
            }
        }
    };
    let _ = s.shutdown(std::net::Shutdown::Both);
    let replies = reader.map(|r| r.join().unwrap());
    format!("flood-{f}: {sent} requests queued, {stalls} write stalls, {end}; replies read: {replies:?}")
}

/// What a reading flooder got back.
#[derive(Debug, Default)]
struct Replies {
    granted: u64,
    over_limit: u64,
    other: u64,
}

fn read_replies(r: &mut UnixStream) -> Replies {
    let mut got = Replies::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) | Err(_) => return got,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        while let Ok(Some((reply, len))) =
            frame::decode_from_buf::<ClientReply>(&buf[used..], Channel::LockClient, 8 << 20)
        {
            used += len;
            match reply {
                ClientReply::Granted { .. } => got.granted += 1,
                ClientReply::Failed {
                    error: LockError::TooManyLocks(_) | LockError::TableFull(_),
                    ..
                } => got.over_limit += 1,
                _ => got.other += 1,
            }
        }
        buf.drain(..used);
    }
}

/// Bound on tandem-replicatord's RSS under an NBD write flood (docs/TESTING.md): the
/// export's 256 MiB request budget, at most once more for the replication frames made of
/// those requests, plus the daemon's own 128 MiB.
const REPLICATORD_RSS_BOUND_MIB: u64 = 640;

#[test]
fn nbd_write_flood_is_pushed_back_and_replicatord_memory_stays_bounded() {
    let _serial = serial();
    use tandem_replicator::nbd::client::NbdClient;
    use tandem_replicator::nbd::proto::{Request, CMD_READ, CMD_WRITE};
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    let daemons: Vec<(usize, u32)> = (0..2).map(|i| (i, c.pid_of(i, "replicatord"))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Three clients pipeline 4 MiB writes as fast as the socket takes them; two never
    // read a reply. A fourth pipelines 16 MiB reads and never reads a reply: its unsent
    // read data may hold only its own share of the export's buffer budget.
    let flooders: Vec<_> = (0..4)
        .map(|f| {
            let stop = stop.clone();
            let sock = c.nbd_socket(0, "www");
            std::thread::spawn(move || {
                let mut s = NbdClient::connect_unix(&sock, "www").unwrap().into_stream();
                s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
                let drain = (f == 2).then(|| {
                    let mut r = s.try_clone().unwrap();
                    std::thread::spawn(move || {
                        let mut sink = vec![0u8; 1 << 16];
                        let mut total = 0u64;
                        while let Ok(n) = r.read(&mut sink) {
                            if n == 0 {
                                break;
                            }
                            total += n as u64;
                        }
                        total / 16
                    })
                });
                let reads = f == 3;
                let payload = if reads { Vec::new() } else { vec![0x5au8; 4 << 20] };
                let (mut sent, mut stalls) = (0u64, 0u64);
                'outer: while !stop.load(Ordering::Relaxed) {
                    let (kind, offset, length) = if reads {
                        (CMD_READ, 0, 16 << 20)
                    } else {
                        (CMD_WRITE, (sent % 7) * (4 << 20), payload.len() as u32)
                    };
                    let header = Request {
                        flags: 0,
                        kind,
                        handle: sent + 1,
                        offset,
                        length,
                    }
                    .encode();
                    let mut req = Vec::with_capacity(28 + payload.len());
                    req.extend_from_slice(&header);
                    req.extend_from_slice(&payload);
                    let mut off = 0;
                    while off < req.len() {
                        if stop.load(Ordering::Relaxed) {
                            break 'outer;
                        }
                        match s.write(&req[off..]) {
                            Ok(n) => off += n,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock
                                        | std::io::ErrorKind::TimedOut
                                ) =>
                            {
                                stalls += 1
                            }
                            Err(e) => panic!("flooder {f}: {e}"),
                        }
                    }
                    sent += 1;
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
                let replies = drain.map(|d| d.join().unwrap());
                let what = if reads { "reads of 16 MiB" } else { "writes of 4 MiB" };
                format!("nbd flood-{f}: {sent} {what} sent, {stalls} write stalls, replies read: {replies:?}")
            })
        })
        .collect();
    let rss = RssWatch::start("replicatord", &daemons, &stop);
    // A well-behaved client writes a block and flushes, again and again.
    let mut slowest = Duration::ZERO;
    let t = Instant::now();
    let mut count = 0;
    while t.elapsed() < Duration::from_secs(12) {
        let w = Instant::now();
        let mut client = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
        client
            .write_at(&[7u8; 4096], 30 << 20, false)
            .expect("a well-behaved write failed during the flood");
        client.flush().unwrap();
        slowest = slowest.max(w.elapsed());
        count += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        eprintln!("  {}", f.join().unwrap());
    }
    eprintln!("{count} well-behaved writes, slowest {slowest:?}");
    for i in 0..2 {
        assert!(c.alive(i, "replicatord"), "n{} died", i + 1);
    }
    rss.check(REPLICATORD_RSS_BOUND_MIB);
    assert!(
        slowest < Duration::from_secs(10),
        "a well-behaved write waited {slowest:?}"
    );
    c.wait_sync_all("www", 60).unwrap();
}

/// Bound on a mount daemon's RSS under a FUSE operation flood (docs/TESTING.md): its
/// metadata cache (16,384 blocks) plus a running transaction and the I/O buffers of the
/// FUSE worker threads.
const MOUNT_RSS_BOUND_MIB: u64 = 256;

#[test]
fn fuse_operation_flood_keeps_the_mount_daemon_bounded_and_the_other_node_served() {
    let _serial = serial();
    use tandem_tests::fscluster::{FsCluster, MNT};
    use tandem_tests::NsWorker;
    let mut f = FsCluster::start_mounted(2).unwrap();
    let pids: Vec<u32> = (0..2).map(|i| f.c.pid_of(i, "fs")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rss = RssWatch::start("mount daemon", &[(0, pids[0]), (1, pids[1])], &stop);
    // 8 threads on n1: write 2 MiB files in 64 KiB pieces, fsync some, list, unlink,
    // make and remove directories, as fast as they can.
    let flood: Vec<_> = (0..8)
        .map(|t| {
            let w = NsWorker::enter(pids[0]).unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                w.run(move || -> std::io::Result<u64> {
                    let chunk = vec![t as u8; 64 << 10];
                    let mut ops = 0u64;
                    let mut k = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        k += 1;
                        let path = format!("{MNT}/flood-{t}-{k}");
                        let mut fh = std::fs::File::create(&path)?;
                        for _ in 0..32 {
                            fh.write_all(&chunk)?;
                            ops += 1;
                        }
                        if k.is_multiple_of(2) {
                            fh.sync_all()?;
                        }
                        drop(fh);
                        let d = format!("{MNT}/dir-{t}-{k}");
                        std::fs::create_dir(&d)?;
                        ops += std::fs::read_dir(MNT)?.count() as u64;
                        std::fs::remove_dir(&d)?;
                        if k > 2 {
                            std::fs::remove_file(format!("{MNT}/flood-{t}-{}", k - 2))?;
                        }
                        ops += 4;
                    }
                    Ok(ops)
                })
            })
        })
        .collect();
    // Meanwhile n2 writes and reads back small files.
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while t.elapsed() < Duration::from_secs(12) {
        let s = Instant::now();
        let name = format!("{MNT}/n2-{n}");
        let back = f
            .w(1)
            .run(move || -> std::io::Result<Vec<u8>> {
                std::fs::write(&name, b"n2 is served")?;
                std::fs::read(&name)
            })
            .expect("n2 failed during the flood");
        assert_eq!(back, b"n2 is served");
        slowest = slowest.max(s.elapsed());
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let ops: u64 = flood
        .into_iter()
        .map(|h| h.join().unwrap().expect("a flood thread failed"))
        .sum();
    eprintln!("{ops} FUSE-level operations on n1; {n} small files on n2, slowest {slowest:?}");
    rss.check(MOUNT_RSS_BOUND_MIB);
    assert!(
        slowest < Duration::from_secs(20),
        "n2 waited {slowest:?} for a small file"
    );
    f.unmount_all_and_check_clean("after the FUSE flood");
}
