//! Crash consistency: simulated power loss through the fault-injecting device (many seeds,
//! every crash mode, including a write that fails part-way through a commit), and kill -9
//! of the real daemon mid-workload. After recovery, fsck must be clean and the state must
//! be one the workload passed through since its last fsync.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_fs::format::LockProto;
use tandem_fs::fs::{Ctx, FileKind, Fs, FsOptions, ROOT_INO};
use tandem_fs::fsck::{fsck, FsckOptions};
use tandem_fs::mkfs::{mkfs, MkfsOptions};
use tandem_fs::{BlockDevice, CrashMode, FaultDevice};

const CTX: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

type Tree = BTreeMap<String, Node>;

fn new_fs(size: u64) -> (Arc<FaultDevice>, Fs) {
    let dev = Arc::new(FaultDevice::new(size));
    let opts = MkfsOptions {
        lock_table: "t:crash".into(),
        journals: 1,
        journal_mib: Some(1),
        block_size: 4096,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    dev.flush().unwrap();
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    (dev, fs)
}

/// Reads the whole tree through the core API.
fn dump(fs: &Fs) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((ino, path)) = stack.pop() {
        let fh = fs.opendir(ino).unwrap();
        for e in fs.readdir(fh, 0).unwrap() {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            match e.kind {
                FileKind::Dir => {
                    out.insert(p.clone(), Node::Dir);
                    stack.push((e.ino, p));
                }
                _ => {
                    let a = fs.getattr(e.ino).unwrap();
                    out.insert(p, Node::File(fs.read(e.ino, 0, a.size as u32 + 1).unwrap()));
                }
            }
        }
        fs.releasedir(fh);
    }
    out
}

fn lookup_path(fs: &Fs, path: &str) -> Option<u64> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = fs.lookup(ino, part.as_bytes()).ok()?.ino;
    }
    Some(ino)
}

fn parent_of(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap()
}

/// One random mutation applied to both the filesystem and the model. Only operations whose
/// data never overwrites durable bytes in place, so every crash state is a model state.
fn step(fs: &Fs, model: &mut Tree, rng: &mut StdRng) -> tandem_fs::Result<bool> {
    let dirs = ["", "/d0", "/d1", "/d0/e"];
    let dir = dirs[rng.gen_range(0..dirs.len())];
    let name = format!("{dir}/f{}", rng.gen_range(0..6));
    let files: Vec<String> = model
        .iter()
        .filter(|(_, n)| matches!(n, Node::File(_)))
        .map(|(p, _)| p.clone())
        .collect();
    let pick = |rng: &mut StdRng| files.get(rng.gen_range(0..files.len().max(1))).cloned();
    match rng.gen_range(0..10) {
        0 | 1 => {
            let (pd, leaf) = parent_of(&name);
            let Some(p) = lookup_path(fs, pd) else {
                return Ok(false);
            };
            if model.contains_key(&name) {
                return Ok(false);
            }
            let len = [0, 10, 3000, 5000, 20000][rng.gen_range(0..5)];
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let a = fs.mknod(CTX, p, leaf.as_bytes(), 0o644, 0, 0)?;
            model.insert(name.clone(), Node::File(Vec::new()));
            fs.write(a.ino, 0, &data)?;
            model.insert(name, Node::File(data));
        }
        2 | 3 => {
            let Some(f) = pick(rng) else { return Ok(false) };
            let ino = lookup_path(fs, &f).unwrap();
            let add: Vec<u8> = (0..rng.gen_range(1..9000)).map(|_| rng.gen()).collect();
            let Some(Node::File(cur)) = model.get_mut(&f) else {
                unreachable!()
            };
            fs.write(ino, cur.len() as u64, &add)?;
            cur.extend_from_slice(&add);
        }
        4 => {
            let Some(f) = pick(rng) else { return Ok(false) };
            let ino = lookup_path(fs, &f).unwrap();
            let Some(Node::File(cur)) = model.get_mut(&f) else {
                unreachable!()
            };
            // Block-aligned: a later append then never rewrites a block that still holds
            // durable bytes (ordered mode does not journal data; see docs/FS.md).
            let n = rng.gen_range(0..=cur.len()) / 4096 * 4096;
            fs.setattr(
                ino,
                tandem_fs::fs::SetAttr {
                    size: Some(n as u64),
                    ..Default::default()
                },
            )?;
            cur.truncate(n);
        }
        5 => {
            let Some(f) = pick(rng) else { return Ok(false) };
            let (pd, leaf) = parent_of(&f);
            fs.unlink(lookup_path(fs, pd).unwrap(), leaf.as_bytes())?;
            model.remove(&f);
        }
        6 => {
            let Some(f) = pick(rng) else { return Ok(false) };
            let (pd, leaf) = parent_of(&f);
            let (nd, nleaf) = parent_of(&name);
            let Some(np) = lookup_path(fs, nd) else {
                return Ok(false);
            };
            if matches!(model.get(&name), Some(Node::Dir)) || f == name {
                return Ok(false);
            }
            fs.rename(
                lookup_path(fs, pd).unwrap(),
                leaf.as_bytes(),
                np,
                nleaf.as_bytes(),
                0,
            )?;
            let n = model.remove(&f).unwrap();
            model.insert(name, n);
        }
        7 => {
            let d = dirs[rng.gen_range(1..dirs.len())];
            let (pd, leaf) = parent_of(d);
            let Some(p) = lookup_path(fs, pd) else {
                return Ok(false);
            };
            if model.contains_key(d) {
                return Ok(false);
            }
            fs.mkdir(CTX, p, leaf.as_bytes(), 0o755, 0)?;
            model.insert(d.to_string(), Node::Dir);
        }
        8 => {
            let x: Vec<u8> = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect();
            let Some(f) = pick(rng) else { return Ok(false) };
            // xattrs are not part of the model; they add metadata traffic only.
            fs.setxattr(lookup_path(fs, &f).unwrap(), b"user.k", &x, 0)?;
            return Ok(false);
        }
        _ => {
            fs.commit()?;
            return Ok(false);
        }
    }
    Ok(true)
}

fn summary(t: &Tree) -> Vec<(String, usize)> {
    t.iter()
        .map(|(p, n)| {
            (
                p.clone(),
                match n {
                    Node::File(d) => d.len(),
                    Node::Dir => usize::MAX,
                },
            )
        })
        .collect()
}

fn check_recovered(img: Vec<u8>, candidates: &[Tree], what: &str) {
    let dev = Arc::new(FaultDevice::from_image(img));
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default())
        .unwrap_or_else(|e| panic!("{what}: remount failed: {e}"));
    let got = dump(&fs);
    fs.shutdown().unwrap();
    assert!(
        candidates.contains(&got),
        "{what}: recovered tree matches no state since the last fsync\n got: {:?}\n candidates: {:?}",
        summary(&got),
        candidates.iter().map(summary).collect::<Vec<_>>()
    );
    let mut sink = |_: &str| {};
    let rep = fsck(dev, FsckOptions { repair: false }, &mut sink).unwrap();
    assert!(
        rep.problems.is_empty(),
        "{what}: fsck after recovery: {:?}",
        rep.problems
    );
}

fn run_workload(seed: u64, mode: CrashMode, fail_after: Option<u64>) {
    let (dev, fs) = new_fs(24 << 20);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Tree::new();
    let mut since_fsync = vec![model.clone()];
    if let Some(n) = fail_after {
        dev.fail_writes_after(Some(n));
    }
    for _ in 0..rng.gen_range(10..60) {
        if rng.gen_bool(0.1) {
            match fs.fsync(ROOT_INO) {
                Ok(()) => since_fsync = vec![model.clone()],
                Err(_) => break,
            }
            continue;
        }
        match step(&fs, &mut model, &mut rng) {
            Ok(true) => since_fsync.push(model.clone()),
            Ok(false) => {}
            Err(_) => {
                // The failed operation may or may not have reached the journal.
                since_fsync.push(model.clone());
                break;
            }
        }
    }
    let img = dev.crash_image(mode, seed);
    check_recovered(
        img,
        &since_fsync,
        &format!("seed {seed} {mode:?} fail_after {fail_after:?}"),
    );
}

/// More seeds for soak runs: TANDEM_CRASH_SEEDS=1000 cargo test --test crash.
fn seeds(default: u64) -> u64 {
    std::env::var("TANDEM_CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn power_loss_at_random_points_recovers_to_a_synced_state() {
    for seed in 0..seeds(40) {
        for mode in [CrashMode::DropAll, CrashMode::RandomSubset, CrashMode::Torn] {
            run_workload(seed, mode, None);
        }
    }
}

#[test]
fn write_errors_part_way_through_commits_leave_a_recoverable_image() {
    for seed in 100..100 + seeds(60) {
        let fail_after = StdRng::seed_from_u64(seed).gen_range(0..400);
        run_workload(seed, CrashMode::Torn, Some(fail_after));
    }
}

#[test]
fn fsynced_data_survives_power_loss_exactly() {
    let (dev, fs) = new_fs(16 << 20);
    let a = fs.mknod(CTX, ROOT_INO, b"durable", 0o644, 0, 0).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    fs.write(a.ino, 0, &data).unwrap();
    fs.fsync(a.ino).unwrap();
    let b = fs.mknod(CTX, ROOT_INO, b"volatile", 0o644, 0, 0).unwrap();
    fs.write(b.ino, 0, b"not synced").unwrap();
    let img = dev.crash_image(CrashMode::DropAll, 1);
    let dev2 = Arc::new(FaultDevice::from_image(img));
    let (fs2, stats) = Fs::mount(dev2, FsOptions::default()).unwrap();
    assert!(!stats.was_clean);
    let got = dump(&fs2);
    assert_eq!(got.get("/durable"), Some(&Node::File(data)));
    assert!(!got.contains_key("/volatile"));
}

#[test]
fn kill_minus_nine_of_the_daemon_keeps_fsynced_files() {
    let mut m = common::Mount::new("64M", "commit=0.05");
    let mut synced: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for round in 0..3 {
        let dir = m.dir.clone();
        std::fs::create_dir_all(dir.join(format!("r{round}"))).unwrap();
        let writer = std::thread::spawn(move || {
            // Unsynced churn that is in flight when the daemon dies.
            for i in 0..100_000 {
                let p = dir.join(format!("r{round}/churn{}", i % 50));
                if std::fs::write(&p, vec![i as u8; (i * 37) % 9000]).is_err() {
                    break;
                }
            }
        });
        for i in 0..5 {
            use std::io::Write;
            let name = format!("r{round}/synced{i}");
            let data: Vec<u8> = (0..(i * 7000 + 10))
                .map(|k| (k * (round + 3) % 251) as u8)
                .collect();
            let mut f = std::fs::File::create(m.path(&name)).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
            synced.insert(name, data);
        }
        std::thread::sleep(std::time::Duration::from_millis(150));
        m.kill9();
        let _ = writer.join();
        m.mount("commit=0.05");
        for (name, data) in &synced {
            assert_eq!(
                &std::fs::read(m.path(name)).unwrap(),
                data,
                "round {round}: {name} lost after kill -9"
            );
        }
    }
    m.unmount();
    let (code, out) = common::fsck(&m.image, "-n");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn concurrent_writers_and_commits_recover_every_fsynced_file() {
    for seed in 0..6u64 {
        let (dev, fs) = new_fs(32 << 20);
        let fs = Arc::new(fs);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let committer = {
            let (fs, stop) = (fs.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs.commit();
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
            })
        };
        let workers: Vec<_> = (0..3u64)
            .map(|w| {
                let fs = fs.clone();
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed * 10 + w);
                    let d = fs
                        .mkdir(CTX, ROOT_INO, format!("w{w}").as_bytes(), 0o755, 0)
                        .unwrap();
                    let mut synced = BTreeMap::new();
                    for i in 0..60 {
                        let name = format!("f{}", rng.gen_range(0..12));
                        let data: Vec<u8> =
                            (0..rng.gen_range(0..12000)).map(|_| rng.gen()).collect();
                        // Replace atomically: write a temp file, then rename over the name.
                        let tmp = format!("tmp{i}");
                        let a = fs.mknod(CTX, d.ino, tmp.as_bytes(), 0o644, 0, 0).unwrap();
                        fs.write(a.ino, 0, &data).unwrap();
                        if rng.gen_bool(0.3) {
                            fs.fsync(a.ino).unwrap();
                            fs.rename(d.ino, tmp.as_bytes(), d.ino, name.as_bytes(), 0)
                                .unwrap();
                            fs.fsync(d.ino).unwrap();
                            synced.insert(name, data);
                        } else {
                            fs.rename(d.ino, tmp.as_bytes(), d.ino, name.as_bytes(), 0)
                                .unwrap();
                            synced.remove(&name);
                        }
                    }
                    (w, synced)
                })
            })
            .collect();
        let results: Vec<_> = workers.into_iter().map(|h| h.join().unwrap()).collect();
        let img = dev.crash_image(CrashMode::Torn, seed);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        committer.join().unwrap();
        let dev2 = Arc::new(FaultDevice::from_image(img));
        let (fs2, _) = Fs::mount(dev2.clone(), FsOptions::default()).unwrap();
        let tree = dump(&fs2);
        for (w, synced) in results {
            for (name, data) in synced {
                let got = tree.get(&format!("/w{w}/{name}"));
                assert_eq!(
                    got,
                    Some(&Node::File(data)),
                    "seed {seed}: /w{w}/{name} lost"
                );
            }
        }
        fs2.shutdown().unwrap();
        let mut sink = |_: &str| {};
        let rep = fsck(dev2, FsckOptions { repair: false }, &mut sink).unwrap();
        assert!(rep.problems.is_empty(), "seed {seed}: {:?}", rep.problems);
    }
}

#[test]
fn open_unlinked_files_are_freed_after_a_crash() {
    let (dev, fs) = new_fs(16 << 20);
    let free_before = fs.statfs().unwrap().bfree;
    let a = fs.mknod(CTX, ROOT_INO, b"tmpfile", 0o644, 0, 0).unwrap();
    fs.open(a.ino).unwrap();
    fs.write(a.ino, 0, &vec![5u8; 100_000]).unwrap();
    fs.unlink(ROOT_INO, b"tmpfile").unwrap();
    assert_eq!(
        fs.read(a.ino, 0, 10).unwrap(),
        vec![5u8; 10],
        "still readable while open"
    );
    fs.fsync(ROOT_INO).unwrap();
    let img = dev.crash_image(CrashMode::DropAll, 0);
    let dev2 = Arc::new(FaultDevice::from_image(img));
    let mut sink = |_: &str| {};
    let rep = fsck(dev2.clone(), FsckOptions { repair: false }, &mut sink).unwrap();
    assert!(
        rep.problems.is_empty(),
        "an open-unlinked inode is legitimate: {:?}",
        rep.problems
    );
    let (fs2, _) = Fs::mount(dev2.clone(), FsOptions::default()).unwrap();
    assert_eq!(
        fs2.statfs().unwrap().bfree,
        free_before,
        "mount frees the orphan"
    );
    fs2.shutdown().unwrap();
    let rep = fsck(dev2, FsckOptions { repair: false }, &mut sink).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

/// Ordered mode: a commit whose flush is cut short never leaves metadata pointing at file
/// data that did not reach the disk (the commit then flushes the data before its commit
/// block can land, see `FlushOrder`).
#[test]
fn a_commit_cut_short_never_exposes_unwritten_file_data() {
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8 | 1).collect();
    for writes in 0..6 {
        for seed in 0..24 {
            let (dev, fs) = new_fs(16 << 20);
            fs.fsync(ROOT_INO).unwrap();
            let a = fs.mknod(CTX, ROOT_INO, b"f", 0o644, 0, 0).unwrap();
            fs.write(a.ino, 0, &data).unwrap();
            dev.fail_writes_after(Some(writes));
            let _ = fs.fsync(a.ino);
            let img = dev.crash_image(CrashMode::RandomSubset, seed);
            let dev2 = Arc::new(FaultDevice::from_image(img));
            let (fs2, _) = Fs::mount(dev2, FsOptions::default()).unwrap();
            if let Ok(f) = fs2.lookup(ROOT_INO, b"f") {
                let got = fs2.read(f.ino, 0, 30_000).unwrap();
                assert!(
                    got.is_empty() || got == data,
                    "{writes} writes, seed {seed}: {} bytes, {} of them not what was written",
                    got.len(),
                    got.iter().zip(&data).filter(|(g, d)| g != d).count()
                );
            }
        }
    }
}
