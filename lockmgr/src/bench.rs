//! `tandem-lockctl bench`: the three lock-manager benchmarks against a running
//! cluster, printed beside the fsync latency of the disk that holds the Raft log.
//!
//! - single: one client, lock EX + unlock on one resource, latency percentiles;
//! - parallel: N clients (default 64) on distinct resources, lock+unlock pairs per second;
//! - contended: 8 clients fighting for one resource, hand-offs (grants) per second.

use crate::client::{Client, ClientError};
use crate::types::{Flags, Mode};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// fdatasync after overwriting preallocated blocks, as the Raft log does.
    pub fsync_p50_us: u64,
    /// fdatasync after an append that grows the file (for comparison).
    pub fsync_append_p50_us: u64,
    pub single_p50_us: u64,
    pub single_p99_us: u64,
    pub parallel_clients: usize,
    pub parallel_pairs_per_s: f64,
    pub contended_clients: usize,
    pub contended_handoffs_per_s: f64,
}

fn percentile_us(sorted: &[Duration], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_micros() as u64
}

/// How the fdatasync benchmark writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncedWrite {
    /// Each 4 KiB block grows the file (what a plain append-only log costs).
    Append,
    /// Each 4 KiB block overwrites zeros written beforehand (what `raft.wal` does).
    Preallocated,
}

/// fdatasync latency (p50) of 4 KiB writes in `dir` (the WAL's directory).
pub fn fsync_p50_us(dir: &Path, samples: usize, how: SyncedWrite) -> std::io::Result<u64> {
    let path = dir.join(".bench-fsync");
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    if how == SyncedWrite::Preallocated {
        for _ in 0..samples {
            f.write_all(&[0u8; 4096])?;
        }
        f.sync_all()?;
        std::io::Seek::rewind(&mut f)?;
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        times.push(t.elapsed());
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    times.sort();
    Ok(percentile_us(&times, 0.5))
}

pub async fn single(
    socket: &Path,
    lockspace: &str,
    ops: usize,
) -> Result<Vec<Duration>, ClientError> {
    let c = Client::connect(socket, "bench-single").await?;
    let mut times = Vec::with_capacity(ops);
    for _ in 0..ops {
        let t = Instant::now();
        let g = c
            .lock(lockspace, b"single", Mode::EX, Flags::default())
            .await?;
        c.unlock(g.lock, None).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times)
}

/// Runs `clients` loops of lock+unlock for `duration`; `shared` puts them all on one
/// resource. Returns completed lock+unlock pairs.
pub async fn loops(
    socket: &Path,
    lockspace: &str,
    clients: usize,
    shared: bool,
    duration: Duration,
) -> Result<u64, ClientError> {
    let mut conns = Vec::new();
    for i in 0..clients {
        conns.push((i, Client::connect(socket, "bench").await?));
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, c) in conns {
        let done = done.clone();
        let stop = stop.clone();
        let lockspace = lockspace.to_string();
        let resource = if shared {
            b"contended".to_vec()
        } else {
            format!("parallel-{i}").into_bytes()
        };
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let g = c
                    .lock(&lockspace, &resource, Mode::EX, Flags::default())
                    .await?;
                c.unlock(g.lock, None).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), ClientError>(())
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let total = done.load(Ordering::Relaxed);
    for t in tasks {
        t.await.map_err(|_| ClientError::Closed)??;
    }
    Ok(total)
}

pub async fn run(
    socket: &Path,
    state_dir: &Path,
    lockspace: &str,
    clients: usize,
    duration: Duration,
) -> Result<BenchReport, ClientError> {
    let fsync = fsync_p50_us(state_dir, 200, SyncedWrite::Preallocated).unwrap_or(0);
    let fsync_append = fsync_p50_us(state_dir, 200, SyncedWrite::Append).unwrap_or(0);
    let single = single(socket, lockspace, 500).await?;
    let pairs = loops(socket, lockspace, clients, false, duration).await?;
    let handoffs = loops(socket, lockspace, 8, true, duration).await?;
    let secs = duration.as_secs_f64();
    Ok(BenchReport {
        fsync_p50_us: fsync,
        fsync_append_p50_us: fsync_append,
        single_p50_us: percentile_us(&single, 0.5),
        single_p99_us: percentile_us(&single, 0.99),
        parallel_clients: clients,
        parallel_pairs_per_s: pairs as f64 / secs,
        contended_clients: 8,
        contended_handoffs_per_s: handoffs as f64 / secs,
    })
}
