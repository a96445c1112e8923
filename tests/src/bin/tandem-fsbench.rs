//! tandem-fsbench: the cluster filesystem's benchmark (issue targets in docs/PERFORMANCE.md).
//! In one run, on a 2-node cluster in network namespaces (lockd + dual-primary replicator
//! each, `lock_tandem` mounted on both):
//! - file creation (create, write 100 bytes, close) on one node alone, on two nodes in
//!   separate directories at once, and on two nodes in one directory at once — with
//!   ratios against the single node and against the local directory `--dir` (its
//!   filesystem type is printed: usually ext4);
//! - close on node A → read on node B sees it: p50 and p99 over `--samples` round trips.
//!
//! Not part of the test suite's pass/fail. Needs root. `./tandem bench fs` runs it on a
//! release build.

use std::time::{Duration, Instant};

use clap::Parser;
use tandem_tests::fscluster::{FsCluster, MNT};

#[derive(Parser)]
#[command(
    name = "tandem-fsbench",
    about = "Cluster filesystem benchmark: one node vs two nodes, and cross-node latency"
)]
struct Args {
    /// Files each node creates per measurement.
    #[arg(long, default_value_t = 1000)]
    files: usize,
    /// Close-to-read round trips for the latency figures.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Local directory for the baseline (same disk as the cluster's backing files).
    #[arg(long, default_value = "/var/tmp")]
    dir: String,
}

/// Creates `n` small files under `dir` (made first); returns files per second.
fn create_files(dir: &str, n: usize, tag: &str) -> std::io::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let t0 = Instant::now();
    for k in 0..n {
        std::fs::write(format!("{dir}/{tag}-{k}"), [b'x'; 100])?;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Nodes 0 and 1 each create `n` files at once, in the directory and with the name prefix
/// `place(node)` gives; returns the aggregate files per second.
fn both_nodes_create(
    f: &FsCluster,
    n: usize,
    place: impl Fn(usize) -> (String, String),
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let hs: Vec<_> = (0..2)
            .map(|i| {
                let (w, (dir, tag)) = (f.w(i), place(i));
                s.spawn(move || w.run(move || create_files(&dir, n, &tag)))
            })
            .collect();
        for h in hs {
            h.join().expect("worker thread")?;
        }
        Ok(())
    })?;
    Ok((2 * n) as f64 / t0.elapsed().as_secs_f64())
}

fn fs_type(path: &str) -> String {
    std::process::Command::new("stat")
        .args(["-f", "-c", "%T", path])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.files;

    // Baseline: the same loop on the local filesystem.
    // The median of three runs: one run of a thousand files on this noisy disk can land
    // on a journal commit or a writeback burst of the previous benchmark.
    let local = format!("{}/tandem-fsbench-{}", args.dir, std::process::id());
    let mut local_runs = Vec::new();
    for run in 0..3 {
        local_runs.push(create_files(&local, n, &format!("f{run}"))?);
    }
    local_runs.sort_by(f64::total_cmp);
    let local_rate = local_runs[1];
    let local_type = fs_type(&args.dir);
    std::fs::remove_dir_all(&local)?;

    eprintln!("starting a 2-node cluster ...");
    let f = FsCluster::start_mounted(2)?;
    // Both nodes touch the root once, so each holds the glock shared at the start.
    for i in 0..2 {
        f.w(i).run(|| std::fs::read_dir(MNT).map(|d| d.count()))?;
    }

    eprintln!("one node creating {n} files ...");
    let single = f
        .w(0)
        .run(move || create_files(&format!("{MNT}/single"), n, "f"))?;

    eprintln!("two nodes creating {n} files each, separate directories ...");
    let separate = both_nodes_create(&f, n, |i| (format!("{MNT}/sep{i}"), "f".into()))?;

    eprintln!("two nodes creating {n} files each, one directory ...");
    f.w(0).run(|| std::fs::create_dir(format!("{MNT}/same")))?;
    let same = both_nodes_create(&f, n, |i| (format!("{MNT}/same"), format!("n{i}")))?;

    eprintln!("close on A -> read on B, {} samples ...", args.samples);
    let glstats_path = |i: usize| {
        f.c.dir()
            .join(format!("run/n{}/tandemfs-test_www.glstats", i + 1))
    };
    // glstats is rewritten every second: let it settle so the deltas cover this phase.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let before: Vec<Option<Vec<u64>>> = (0..2).map(|i| meta_counters(&glstats_path(i))).collect();
    let mut lat = Vec::with_capacity(args.samples);
    let (mut write_lat, mut read_lat) = (lat.clone(), lat.clone());
    for k in 0..args.samples as u32 {
        let (a, b) = ((k % 2) as usize, ((k + 1) % 2) as usize);
        let t0 = Instant::now();
        f.w(a)
            .run(move || std::fs::write(format!("{MNT}/lat"), k.to_le_bytes()))?;
        let t1 = Instant::now();
        let got = f.w(b).run(|| std::fs::read(format!("{MNT}/lat")))?;
        lat.push(t0.elapsed());
        write_lat.push(t1 - t0);
        read_lat.push(t1.elapsed());
        anyhow::ensure!(got == k.to_le_bytes(), "node {b} read a stale value");
    }
    lat.sort();
    write_lat.sort();
    read_lat.sort();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut phase = String::new();
    for (i, b) in before.iter().enumerate() {
        if let (Some(b), Some(a)) = (b, meta_counters(&glstats_path(i))) {
            let d = |k: usize| a[k].saturating_sub(b[k]);
            let n = d(3).max(1);
            phase += &format!(
                "n{}: {} demotions, per demotion: wait {} µs, flush {} µs, lock-manager call {} µs; {} acquisitions, avg {} µs\n",
                i + 1,
                d(3),
                d(5) / n,
                d(4) / n,
                d(6) / n,
                d(0),
                // glstats keeps the average; average × count recovers the total.
                (a[0] * a[1]).saturating_sub(b[0] * b[1]) / d(0).max(1)
            );
        }
    }
    let glstats: Vec<String> = (0..2)
        .map(|i| {
            std::fs::read_to_string(
                f.c.dir()
                    .join(format!("run/n{}/tandemfs-test_www.glstats", i + 1)),
            )
            .unwrap_or_default()
        })
        .collect();
    drop(f);

    println!("| file creation (create + 100 B write + close) | files/s | vs one node | vs local {local_type} |");
    println!("|---|---|---|---|");
    let row = |name: &str, r: f64| {
        println!(
            "| {name} | {r:.0} | {:.2}× | {:.3}× |",
            r / single,
            r / local_rate
        )
    };
    row(&format!("local {local_type} ({})", args.dir), local_rate);
    row("Tandem, one node (the other mounted, idle)", single);
    row(
        "Tandem, two nodes, separate directories (aggregate)",
        separate,
    );
    row("Tandem, two nodes, one directory (aggregate)", same);
    println!();
    println!(
        "close on A -> read on B sees it: p50 {:.2} ms, p99 {:.2} ms ({} samples; target p50 <= 5 ms)",
        pct(&lat, 50).as_secs_f64() * 1e3,
        pct(&lat, 99).as_secs_f64() * 1e3,
        lat.len()
    );
    println!(
        "of which the write on A (its glock to EX: the reader lets go) p50 {:.2} ms, the read on B (to PR: the writer flushes) p50 {:.2} ms",
        pct(&write_lat, 50).as_secs_f64() * 1e3,
        pct(&read_lat, 50).as_secs_f64() * 1e3
    );
    if !phase.is_empty() {
        println!("\nduring close -> read (from glstats):\n{phase}");
    }
    for (i, g) in glstats.iter().enumerate() {
        println!("\nglstats n{}:\n{g}", i + 1);
    }
    Ok(())
}

/// The `meta` line of a glstats file: acquires, avg_acq_us, max_acq_us, demotes,
/// flush_total_us, wait_total_us, lower_total_us.
fn meta_counters(path: &std::path::Path) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with("meta "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.len() >= 7).then_some(v)
}
