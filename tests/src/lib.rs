//! Multi-node test harness for Tandem: real processes, each node in its own network
//! namespace (veth + bridge, private addresses) and mount namespace. Used by the
//! replicator, lock manager, filesystem and Pacemaker scenarios in `tests/`.

pub mod cluster;
pub mod faults;
pub mod fscluster;
pub mod netns;
pub mod nsworker;
pub mod oracle;

pub use cluster::{bin, bin_dir, Cluster, ResourceSpec};
pub use faults::Faults;
pub use nsworker::NsWorker;

/// crc32 of a byte range of a file (for comparing copies).
pub fn file_crc(path: &std::path::Path, offset: u64, len: u64) -> anyhow::Result<u32> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut h = crc32fast::Hasher::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize())
}

/// Runs a program and returns (success, stdout+stderr).
pub fn run_tool(program: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(program).args(args).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text += &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}
