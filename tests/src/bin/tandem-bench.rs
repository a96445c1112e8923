//! tandem-bench: replicator benchmark. Prints, in one run, the raw backing file against
//! the replicated volume (1 node, 2 nodes protocol C, 3 nodes, in network namespaces):
//! sequential 1 MiB write MB/s, 4 KiB QD1 write+flush latency p50/p99, and 4 KiB QD32
//! random write IOPS, with ratios. Not part of the test suite's pass/fail.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use tandem_replicator::nbd::client::NbdClient;
use tandem_tests::{Cluster, ResourceSpec};

#[derive(Parser)]
#[command(
    name = "tandem-bench",
    about = "Replicator benchmark: raw disk vs replicated, with ratios"
)]
struct Args {
    /// Volume size in MiB (also the sequential write size).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// QD1 write+flush samples.
    #[arg(long, default_value_t = 400)]
    qd1_samples: usize,
    /// Seconds of QD32 random writes per configuration.
    #[arg(long, default_value_t = 3)]
    qd32_secs: u64,
    /// Directory for the raw file (same filesystem as the cluster's disks).
    #[arg(long, default_value = "/var/tmp")]
    dir: String,
    /// Measure only the raw baselines and the 2-node resync (quick iteration on resync).
    #[arg(long)]
    resync_only: bool,
}

#[derive(Clone, Copy, Default)]
struct Result3 {
    seq_mb_s: f64,
    p50_us: f64,
    p99_us: f64,
    iops: f64,
}

trait Target: Send + Sync {
    fn client(&self) -> Box<dyn Io>;
}

trait Io: Send {
    fn write(&mut self, buf: &[u8], off: u64);
    fn flush(&mut self);
}

struct RawFile(std::fs::File);
impl Io for RawFile {
    fn write(&mut self, buf: &[u8], off: u64) {
        self.0.write_all_at(buf, off).expect("raw write");
    }
    fn flush(&mut self) {
        self.0.sync_data().expect("raw fdatasync");
    }
}
struct RawTarget(std::path::PathBuf);
impl Target for RawTarget {
    fn client(&self) -> Box<dyn Io> {
        Box::new(RawFile(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.0)
                .expect("open raw"),
        ))
    }
}

/// N copies written by one client, flushed in parallel: what the hardware gives when the
/// same bytes must reach N files on this one disk (the floor for an N-node cluster here).
struct MultiRaw(Vec<std::fs::File>);
impl Io for MultiRaw {
    fn write(&mut self, buf: &[u8], off: u64) {
        for f in &self.0 {
            f.write_all_at(buf, off).expect("raw write");
        }
    }
    fn flush(&mut self) {
        std::thread::scope(|s| {
            for f in &self.0 {
                s.spawn(move || f.sync_data().expect("raw fdatasync"));
            }
        });
    }
}
struct MultiRawTarget(Vec<std::path::PathBuf>);
impl Target for MultiRawTarget {
    fn client(&self) -> Box<dyn Io> {
        Box::new(MultiRaw(
            self.0
                .iter()
                .map(|p| {
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(p)
                        .expect("open raw")
                })
                .collect(),
        ))
    }
}

struct Nbd(NbdClient);
impl Io for Nbd {
    fn write(&mut self, buf: &[u8], off: u64) {
        self.0.write_at(buf, off, false).expect("nbd write");
    }
    fn flush(&mut self) {
        self.0.flush().expect("nbd flush");
    }
}
struct NbdTarget(std::path::PathBuf);
impl Target for NbdTarget {
    fn client(&self) -> Box<dyn Io> {
        Box::new(Nbd(
            NbdClient::connect_unix(&self.0, "www").expect("nbd connect")
        ))
    }
}

fn measure(t: &dyn Target, size_bytes: u64, args: &Args) -> Result3 {
    // Sequential 1 MiB writes of the whole volume, then one flush.
    let mut io = t.client();
    let chunk = vec![0xA5u8; 1 << 20];
    let start = Instant::now();
    let mut off = 0;
    while off < size_bytes {
        io.write(&chunk, off);
        off += chunk.len() as u64;
    }
    io.flush();
    let seq_mb_s = size_bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
    // QD1 4 KiB write + flush.
    let block = vec![0x5Au8; 4096];
    let mut lat = Vec::with_capacity(args.qd1_samples);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..args.qd1_samples {
        let off = rng.gen_range(0..size_bytes / 4096) * 4096;
        let s = Instant::now();
        io.write(&block, off);
        io.flush();
        lat.push(s.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let p50_us = lat[lat.len() / 2];
    let p99_us = lat[lat.len() * 99 / 100];
    // QD32: 32 clients with random 4 KiB writes.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for i in 0..32u64 {
            let mut io = t.client();
            let stop = stop.clone();
            let ops = ops.clone();
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i);
                let block = vec![i as u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.gen_range(0..size_bytes / 4096) * 4096;
                    io.write(&block, off);
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs(args.qd32_secs));
        stop.store(true, Ordering::Relaxed);
    });
    let iops = ops.load(Ordering::Relaxed) as f64 / args.qd32_secs as f64;
    Result3 {
        seq_mb_s,
        p50_us,
        p99_us,
        iops,
    }
}

fn cluster(nodes: usize, size_mib: u64) -> anyhow::Result<Cluster> {
    let mut c = Cluster::builder()
        .nodes(nodes)
        .resource(ResourceSpec {
            size: format!("{size_mib}MiB"),
            io_engine: std::env::var("TANDEM_IO_ENGINE").unwrap_or_else(|_| "uring".into()),
            ..ResourceSpec::default()
        })
        .start()?;
    if nodes == 1 {
        c.adm(0, &["create-md", "www"])?;
        c.start_replicator(0)?;
        c.adm(0, &["up", "www"])?;
        c.adm(0, &["primary", "--force", "www"])?;
    } else {
        c.bring_up_fresh("www")?;
    }
    Ok(c)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let size_bytes = args.size_mib << 20;
    let raw_paths: Vec<_> = (0..3)
        .map(|i| {
            Path::new(&args.dir).join(format!("tandem-bench-raw-{}-{i}.img", std::process::id()))
        })
        .collect();
    for p in &raw_paths {
        std::fs::write(p, b"")?;
        OpenOptions::new()
            .write(true)
            .open(p)?
            .set_len(size_bytes)?;
    }
    eprintln!("measuring raw file {} ...", raw_paths[0].display());
    let raw = measure(&RawTarget(raw_paths[0].clone()), size_bytes, &args);
    let raw_copy_mb_s = raw_copy_mb_s(&raw_paths[0], &raw_paths[1], size_bytes)?;
    let link_mb_s = tcp_loopback_mb_s(size_bytes)?;
    // The resync target is against min(raw disk, link).
    let floor_mb_s = raw_copy_mb_s.min(link_mb_s);
    let mut rows = vec![("raw backing file".to_string(), raw)];
    for n in [2usize, 3] {
        if args.resync_only {
            break;
        }
        let r = measure(&MultiRawTarget(raw_paths[..n].to_vec()), size_bytes, &args);
        rows.push((format!("raw, {n} copies on this one disk (no network)"), r));
    }
    for p in &raw_paths {
        let _ = std::fs::remove_file(p);
    }
    let mut resync = None;
    let mut target_io = None;
    let node_counts: &[usize] = if args.resync_only { &[2] } else { &[1, 2, 3] };
    for &nodes in node_counts {
        eprintln!("measuring {nodes}-node cluster ...");
        let c = cluster(nodes, args.size_mib)?;
        let r = measure(&NbdTarget(c.nbd_socket(0, "www")), size_bytes, &args);
        rows.push((
            format!(
                "replicated, {nodes} node{}, protocol C",
                if nodes > 1 { "s" } else { "" }
            ),
            r,
        ));
        if nodes == 2 {
            let mut c = c;
            resync = Some(measure_resync(&mut c, size_bytes)?);
            target_io = Some(measure_target_io(&c, size_bytes)?);
        } else {
            drop(c);
        }
    }
    println!(
        "| configuration | seq 1MiB write MB/s (ratio) | 4KiB write+flush p50 µs (Δ vs raw) | p99 µs | QD32 4KiB IOPS (ratio) |"
    );
    println!("|---|---|---|---|---|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} ({:.2}×) | {:.0} ({:+.0}) | {:.0} | {:.0} ({:.2}×) |",
            r.seq_mb_s,
            r.seq_mb_s / raw.seq_mb_s,
            r.p50_us,
            r.p50_us - raw.p50_us,
            r.p99_us,
            r.iops,
            r.iops / raw.iops
        );
    }
    if let Some(r) = resync {
        println!();
        println!("| resync (2 nodes, whole volume dirty) | MB/s | ratio vs min(raw copy {raw_copy_mb_s:.0}, TCP loopback {link_mb_s:.0}) MB/s | bytes moved | app 4KiB write+flush on n1 during resync: p50 / p99 µs (samples) |");
        println!("|---|---|---|---|---|");
        println!(
            "| SyncSource's own rate (first to last chunk) | {:.0} | {:.2}× | {} | {:.0} / {:.0} ({}) |",
            r.daemon_mb_s,
            r.daemon_mb_s / floor_mb_s,
            r.moved,
            r.p50_us,
            r.p99_us,
            r.samples
        );
        println!(
            "| end to end (`up` of the restarted node to UpToDate) | {:.0} | {:.2}× | | |",
            r.end_to_end_mb_s,
            r.end_to_end_mb_s / floor_mb_s
        );
    }
    if let Some((mut in_sync, mut target)) = target_io {
        println!();
        println!("| n1 Primary, 2 nodes (`invalidate` on n1: full resync from n2) | 4KiB write+flush p50 / p99 µs | 4KiB read p50 / p99 µs | samples |");
        println!("|---|---|---|---|");
        println!("| in sync (before) | {} |", in_sync.row());
        println!(
            "| SyncTarget (reads of blocks not yet resynced go to n2) | {} |",
            target.row()
        );
    }
    Ok(())
}

/// What the link gives without the replicator: one TCP stream over loopback (the
/// cluster's veth pairs run over the same kernel path), `size_bytes` in 1 MiB writes.
fn tcp_loopback_mb_s(size_bytes: u64) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let chunk = vec![0x5Au8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0;
    while sent < size_bytes {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    drop(s);
    let got = reader.join().expect("reader thread")?;
    anyhow::ensure!(got == sent, "loopback stream lost bytes: {got} of {sent}");
    Ok(sent as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// What a resync costs without a network or a daemon: read one file and write another on
/// this same disk in 1 MiB pieces, then fdatasync — the floor for a resync between two
/// nodes whose disks share this machine's one disk.
fn raw_copy_mb_s(src: &Path, dst: &Path, size_bytes: u64) -> anyhow::Result<f64> {
    let (src, dst) = (
        OpenOptions::new().read(true).open(src)?,
        OpenOptions::new().write(true).open(dst)?,
    );
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut off = 0;
    while off < size_bytes {
        src.read_exact_at(&mut buf, off)?;
        dst.write_all_at(&buf, off)?;
        off += buf.len() as u64;
    }
    dst.sync_data()?;
    Ok(size_bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

struct ResyncResult {
    /// The SyncSource's own figure (its log), from the first chunk sent to the last ack.
    daemon_mb_s: f64,
    /// From `tandemadm up` of the restarted node until it reports UpToDate/Established.
    end_to_end_mb_s: f64,
    p50_us: f64,
    p99_us: f64,
    samples: usize,
    moved: u64,
}

/// The rate the SyncSource logged with its "resync done (SyncSource)" line, in MB/s.
fn logged_resync_mb_s(log: &str) -> Option<f64> {
    // Drop ANSI styling (ESC [ ... m) so the field reads `mib_per_s=N`.
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(ch);
        }
    }
    let line = plain
        .lines()
        .rev()
        .find(|l| l.contains("resync done (SyncSource)"))?;
    let v = line.split("mib_per_s=").nth(1)?.split_whitespace().next()?;
    Some(v.trim_matches('"').parse::<f64>().ok()? * 1048576.0 / 1e6)
}

/// Kills node 2, dirties the whole volume on node 1, restarts node 2 and times the resync,
/// sampling application write+flush latency on node 1 meanwhile.
/// 4 KiB write+flush and 4 KiB read latencies (µs, sorted) on a Primary.
#[derive(Default)]
struct IoLatency {
    write_us: Vec<f64>,
    read_us: Vec<f64>,
}

impl IoLatency {
    fn sample(&mut self, io: &mut NbdClient, size_bytes: u64, rng: &mut rand::rngs::StdRng) {
        let block = vec![0x22u8; 4096];
        let mut buf = vec![0u8; 4096];
        let s = Instant::now();
        io.write_at(&block, rng.gen_range(0..size_bytes / 4096) * 4096, false)
            .expect("nbd write");
        io.flush().expect("nbd flush");
        self.write_us.push(s.elapsed().as_secs_f64() * 1e6);
        let s = Instant::now();
        io.read_at(&mut buf, rng.gen_range(0..size_bytes / 4096) * 4096)
            .expect("nbd read");
        self.read_us.push(s.elapsed().as_secs_f64() * 1e6);
    }

    fn pct(v: &mut [f64], p: usize) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v.get(v.len() * p / 100).copied().unwrap_or(0.0)
    }

    fn row(&mut self) -> String {
        format!(
            "{:.0} / {:.0} | {:.0} / {:.0} | {}",
            Self::pct(&mut self.write_us, 50),
            Self::pct(&mut self.write_us, 99),
            Self::pct(&mut self.read_us, 50),
            Self::pct(&mut self.read_us, 99),
            self.write_us.len()
        )
    }
}

/// The Primary n1 invalidated (its whole volume comes back from n2): I/O latency on it
/// while it is SyncTarget, against the same in sync just before (target_io.rs).
fn measure_target_io(c: &Cluster, size_bytes: u64) -> anyhow::Result<(IoLatency, IoLatency)> {
    eprintln!("measuring I/O on a Primary that is SyncTarget ...");
    let mut io = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut in_sync = IoLatency::default();
    for _ in 0..400 {
        in_sync.sample(&mut io, size_bytes, &mut rng);
    }
    c.adm(0, &["invalidate", "www"])?;
    let mut target = IoLatency::default();
    let start = Instant::now();
    loop {
        let st = c.status_json(0)?;
        if st[0]["connections"][0]["replication-state"] != "SyncTarget" {
            if st[0]["disk-state"] == "UpToDate" && start.elapsed() > Duration::from_millis(200) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "resync of n1 did not finish in 300 s"
        );
        for _ in 0..20 {
            target.sample(&mut io, size_bytes, &mut rng);
        }
    }
    Ok((in_sync, target))
}

fn measure_resync(c: &mut Cluster, size_bytes: u64) -> anyhow::Result<ResyncResult> {
    eprintln!("measuring resync ...");
    c.kill9(1);
    std::thread::sleep(Duration::from_millis(300));
    let mut io = NbdTarget(c.nbd_socket(0, "www")).client();
    let chunk = vec![0x3Cu8; 1 << 20];
    let mut off = 0;
    while off < size_bytes {
        io.write(&chunk, off);
        off += chunk.len() as u64;
    }
    io.flush();
    c.start_replicator(1)?;
    let start = Instant::now();
    c.adm(1, &["up", "www"])?;
    let mut lat = Vec::new();
    let block = vec![0x11u8; 4096];
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    loop {
        let st = c.status_json(1)?;
        let repl = &st[0]["connections"][0]["replication-state"];
        // Right after the handshake the target still reads UpToDate/Established for a
        // moment before the source's SyncStart arrives: also wait for the bytes.
        let received = st[0]["resync-received-bytes"].as_u64().unwrap_or(0);
        let done =
            st[0]["disk-state"] == "UpToDate" && repl == "Established" && received >= size_bytes;
        // Only samples taken while the resync runs count (not those before the connect).
        let syncing = repl == "SyncTarget";
        if done && start.elapsed() > Duration::from_millis(200) {
            break;
        }
        if start.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("resync did not finish in 300 s");
        }
        for _ in 0..20 {
            let s = Instant::now();
            io.write(&block, rng.gen_range(0..size_bytes / 4096) * 4096);
            io.flush();
            if syncing {
                lat.push(s.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let moved = c.status_json(1)?[0]["resync-received-bytes"]
        .as_u64()
        .unwrap_or(0);
    lat.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let pct = |p: usize| lat.get(lat.len() * p / 100).copied().unwrap_or(0.0);
    // The source logs its figure just after the target reports UpToDate.
    let mut daemon_mb_s = None;
    c.wait_for(Duration::from_secs(10), || {
        daemon_mb_s = logged_resync_mb_s(&c.log(0, "replicatord"));
        Ok(daemon_mb_s.is_some())
    })
    .map_err(|_| anyhow::anyhow!("node 1 logged no \"resync done (SyncSource)\""))?;
    let daemon_mb_s = daemon_mb_s.unwrap_or_default();
    Ok(ResyncResult {
        daemon_mb_s,
        end_to_end_mb_s: moved as f64 / secs / 1e6,
        p50_us: pct(50),
        p99_us: pct(99),
        samples: lat.len(),
        moved,
    })
}
