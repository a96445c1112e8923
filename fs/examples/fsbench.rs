//! Benchmark of the targets, printing tandem/ext4 ratios from one run:
//! `cargo build --release -p tandem-fs --bins && cargo run --release -p tandem-fs --example
//! fsbench [-- SCALE]` (root; needs mkfs.ext4, losetup and /dev/fuse). SCALE (default 1.0)
//! multiplies the file counts.
//!
//! ext4 runs on a loop device over an image file in the same directory as tandem's image,
//! so both see the same backing storage. Caches are dropped before the cold reads.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Cold caches: write back what is dirty first (drop_caches keeps dirty pages, and the
/// writeback would then run during the measurement), then drop them.
fn drop_caches() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

struct Results(Vec<(String, f64)>);

fn run(dir: &Path, scale: f64) -> Results {
    let n = (10_000.0 * scale) as usize;
    let mut r = Vec::new();
    let files = dir.join("files");
    fs::create_dir(&files).unwrap();
    let block = vec![0x61u8; 4096];
    let t = Instant::now();
    for i in 0..n {
        fs::File::create(files.join(format!("f{i}")))
            .unwrap()
            .write_all(&block)
            .unwrap();
    }
    r.push((
        "create+4KiB write (files/s)".into(),
        n as f64 / t.elapsed().as_secs_f64(),
    ));
    // First pass brings attributes into the caches (FUSE drops them after each write).
    for i in 0..n {
        fs::metadata(files.join(format!("f{i}"))).unwrap();
    }
    let t = Instant::now();
    for i in 0..n {
        fs::metadata(files.join(format!("f{i}"))).unwrap();
    }
    r.push((
        "stat cached (stats/s)".into(),
        n as f64 / t.elapsed().as_secs_f64(),
    ));
    let big = dir.join("big");
    let mib = 512;
    let chunk = vec![0x62u8; 1 << 20];
    let t = Instant::now();
    let mut f = fs::File::create(&big).unwrap();
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    r.push((
        "sequential 1 MiB write + fsync (MiB/s)".into(),
        mib as f64 / t.elapsed().as_secs_f64(),
    ));
    drop(f);
    drop_caches();
    let t = Instant::now();
    let mut f = fs::File::open(&big).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
    r.push((
        "sequential 1 MiB read, cold (MiB/s)".into(),
        mib as f64 / t.elapsed().as_secs_f64(),
    ));
    let small = dir.join("small");
    fs::create_dir(&small).unwrap();
    let m = (2000.0 * scale) as usize;
    let eight = vec![0x63u8; 8192];
    for i in 0..m {
        fs::write(small.join(format!("s{i}")), &eight).unwrap();
    }
    sh("sync");
    drop_caches();
    let t = Instant::now();
    for i in 0..m {
        let d = fs::read(small.join(format!("s{i}"))).unwrap();
        assert_eq!(d.len(), 8192);
    }
    r.push((
        "read back 8 KiB files, cold (files/s)".into(),
        m as f64 / t.elapsed().as_secs_f64(),
    ));
    let many = dir.join("many");
    fs::create_dir(&many).unwrap();
    let k = (100_000.0 * scale) as usize;
    for i in 0..k {
        fs::File::create(many.join(format!("entry-{i:06}"))).unwrap();
    }
    drop_caches();
    let t = Instant::now();
    let out = Command::new("ls")
        .arg("-l")
        .arg(&many)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success());
    r.push((
        format!("ls -l of {k} entries, cold (listings/s)"),
        1.0 / t.elapsed().as_secs_f64(),
    ));
    Results(r)
}

struct TandemMount(Child, PathBuf);
impl Drop for TandemMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.1).status();
        let t = Instant::now();
        while self.0.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
    }
}

fn main() {
    let scale: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    // The tandemfs built beside this example (target/<profile>/examples/fsbench), never
    // one found elsewhere: a stale binary would measure old code.
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("tandemfs")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            eprintln!("fsbench: tandemfs is not built beside this example; run `cargo build --release -p tandem-fs --bins` first");
            std::process::exit(2)
        });
    let size = "3G";

    let ext_img = tmp.path().join("ext4.img");
    let ext_mnt = tmp.path().join("ext4");
    fs::create_dir(&ext_mnt).unwrap();
    sh(&format!("truncate -s {size} {}", ext_img.display()));
    let loopdev = sh(&format!("losetup -f --show {}", ext_img.display()));
    sh(&format!("mkfs.ext4 -q -F {loopdev}"));
    sh(&format!("mount {loopdev} {}", ext_mnt.display()));
    let ext = run(&ext_mnt, scale);
    sh(&format!("umount {}", ext_mnt.display()));
    sh(&format!("losetup -d {loopdev}"));

    let img = tmp.path().join("tandem.img");
    let mnt = tmp.path().join("tandem");
    fs::create_dir(&mnt).unwrap();
    let st = Command::new(&bin)
        .args([
            "mkfs",
            "-q",
            "-t",
            "bench:fs",
            "-p",
            "lock_nolock",
            "-s",
            size,
        ])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let child = Command::new(&bin)
        .arg("mount")
        .arg(&img)
        .arg(&mnt)
        .arg("-f")
        .spawn()
        .unwrap();
    let guard = TandemMount(child, mnt.clone());
    let t = Instant::now();
    while !sh("cat /proc/self/mountinfo").contains(mnt.to_str().unwrap()) {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let tandem = run(&mnt, scale);
    drop(guard);

    println!(
        "{:<45} {:>12} {:>12} {:>7}",
        "workload", "tandem", "ext4", "ratio"
    );
    for ((name, tv), (_, ev)) in tandem.0.iter().zip(ext.0.iter()) {
        println!("{name:<45} {tv:>12.1} {ev:>12.1} {:>7.2}", tv / ev);
    }
}
