//! The cluster filesystem across real processes: 3 nodes in network namespaces (lockd +
//! dual-primary replicator each), `lock_tandem` mounted at each node's own
//! `/var/www/html` in its own mount namespace.

use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use tandem_tests::fscluster::{FsCluster, MNT, RES};

fn p(rel: &str) -> String {
    format!("{MNT}/{rel}")
}

#[test]
fn close_on_one_node_is_seen_by_open_stat_readdir_read_on_the_others() {
    let mut f = FsCluster::start_mounted(3).unwrap();
    // A file written and closed on n1 is read on n2 and n3.
    f.w(0)
        .run(|| std::fs::write(p("index.html"), b"hello from n1\n"))
        .unwrap();
    for i in 1..3 {
        let got = f.w(i).run(|| std::fs::read(p("index.html"))).unwrap();
        assert_eq!(got, b"hello from n1\n", "n{}", i + 1);
    }
    // An open file on n2 sees n3's later write (no stale page cache).
    let f2 = f.w(1).run(|| std::fs::File::open(p("index.html"))).unwrap();
    let f2 = std::sync::Arc::new(f2);
    let g = f2.clone();
    let n = f.w(1).run(move || g.read_at(&mut [0u8; 14], 0)).unwrap();
    assert_eq!(n, 14);
    f.w(2)
        .run(|| std::fs::write(p("index.html"), b"HELLO FROM N3\n"))
        .unwrap();
    let g = f2.clone();
    let buf = f
        .w(1)
        .run(move || {
            let mut b = [0u8; 14];
            g.read_exact_at(&mut b, 0).map(|()| b)
        })
        .unwrap();
    assert_eq!(&buf, b"HELLO FROM N3\n");
    drop(f2);
    // mkdir, chmod, rename and unlink are visible at once elsewhere.
    f.w(0).run(|| std::fs::create_dir(p("d"))).unwrap();
    f.w(1)
        .run(|| std::fs::set_permissions(p("d"), std::fs::Permissions::from_mode(0o700)))
        .unwrap();
    let mode = f
        .w(2)
        .run(|| std::fs::metadata(p("d")).map(|m| m.permissions().mode()))
        .unwrap();
    assert_eq!(mode & 0o7777, 0o700);
    f.w(2)
        .run(|| std::fs::rename(p("index.html"), p("d/page.html")))
        .unwrap();
    let names = f
        .w(0)
        .run(|| {
            std::fs::read_dir(p("d")).map(|it| {
                it.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .unwrap();
    assert_eq!(names, ["page.html"]);
    assert!(!f.w(1).run(|| Path::new(&p("index.html")).exists()));
    f.w(1)
        .run(|| std::fs::remove_file(p("d/page.html")))
        .unwrap();
    assert!(!f.w(0).run(|| Path::new(&p("d/page.html")).exists()));
    // Unlink of a file open on another node: still readable there until closed; the last
    // closer frees it (its blocks come back).
    let free_blocks = |f: &FsCluster| f.w(0).run(|| statvfs_free_blocks(MNT));
    let before_open_elsewhere = free_blocks(&f);
    f.w(0)
        .run(|| std::fs::write(p("open-elsewhere"), vec![7u8; 50_000]))
        .unwrap();
    let fh = std::sync::Arc::new(
        f.w(1)
            .run(|| std::fs::File::open(p("open-elsewhere")))
            .unwrap(),
    );
    f.w(0)
        .run(|| std::fs::remove_file(p("open-elsewhere")))
        .unwrap();
    assert!(!f.w(2).run(|| Path::new(&p("open-elsewhere")).exists()));
    let data = read_on(&f, 1, &fh, 50_000).unwrap();
    assert!(
        data.iter().all(|b| *b == 7),
        "unlinked file unreadable where it is open"
    );
    drop(fh); // the last handle: n2 closes the file and frees it
    f.c.wait_for(std::time::Duration::from_secs(10), || {
        Ok(free_blocks(&f) + 2 >= before_open_elsewhere)
    })
    .unwrap_or_else(|e| {
        panic!(
            "the last close of a file unlinked elsewhere did not free it: {e} ({} free blocks, {before_open_elsewhere} before)",
            free_blocks(&f)
        )
    });

    // Unlinked on the node that has it open: its own last close frees it.
    let before = free_blocks(&f);
    let fh = f
        .w(1)
        .run(|| {
            std::fs::write(p("open-here"), vec![3u8; 50_000])?;
            std::fs::File::open(p("open-here"))
        })
        .unwrap();
    f.w(1).run(|| std::fs::remove_file(p("open-here"))).unwrap();
    f.w(1).run(move || drop(fh));
    f.c.wait_for(std::time::Duration::from_secs(10), || {
        Ok(free_blocks(&f) + 2 >= before)
    })
    .unwrap_or_else(|e| panic!("a file unlinked while open on the same node was not freed: {e}"));

    // Deleting a file the other nodes only read (their iopen locks stay cached, idle,
    // after the close) frees it at once: the deleter's try calls them back, they drop the
    // lock and their reaper frees the inode. Without that its blocks would stay in use.
    // The readers keep it open across a hand-off of `meta` (n1 writes), which is when
    // they take their iopen locks.
    let before = free_blocks(&f);
    f.w(0)
        .run(|| std::fs::write(p("cached-elsewhere"), vec![5u8; 2 << 20]))
        .unwrap();
    let readers: Vec<_> = (1..3)
        .map(|i| {
            f.w(i)
                .run(|| -> std::io::Result<std::fs::File> {
                    let mut fh = std::fs::File::open(p("cached-elsewhere"))?;
                    let mut got = Vec::new();
                    std::io::Read::read_to_end(&mut fh, &mut got)?;
                    assert_eq!(got.len(), 2 << 20);
                    Ok(fh)
                })
                .unwrap()
        })
        .collect();
    f.w(0).run(|| std::fs::write(p("poke"), b"x")).unwrap();
    for (i, fh) in readers.into_iter().enumerate() {
        f.w(i + 1).run(move || drop(fh));
    }
    assert!(free_blocks(&f) + 256 < before, "the 2 MiB file uses blocks");
    f.w(0)
        .run(|| std::fs::remove_file(p("cached-elsewhere")))
        .unwrap();
    f.c.wait_for(std::time::Duration::from_secs(10), || {
        Ok(free_blocks(&f) + 8 >= before)
    })
    .unwrap_or_else(|e| {
        panic!(
            "a deleted file whose iopen lock was cached elsewhere was not freed: {e} ({} free blocks, {before} before)",
            free_blocks(&f)
        )
    });

    // Latency of close on A -> read on B, ping-ponging the glock.
    let mut lat = Vec::new();
    for k in 0..50u32 {
        let (a, b) = ((k % 3) as usize, ((k + 1) % 3) as usize);
        let t0 = Instant::now();
        f.w(a)
            .run(move || std::fs::write(p("lat"), k.to_le_bytes()))
            .unwrap();
        let got = f.w(b).run(|| std::fs::read(p("lat"))).unwrap();
        lat.push(t0.elapsed());
        assert_eq!(got, k.to_le_bytes());
    }
    lat.sort();
    eprintln!(
        "close on A -> read on B: p50 {:?} p99 {:?}",
        lat[25], lat[49]
    );
    // The operator view: every node's glstats file counts its glock acquisitions.
    for i in 0..3 {
        let path =
            f.c.dir()
                .join(format!("run/n{}/tandemfs-test_www.glstats", i + 1));
        f.c.wait_for(std::time::Duration::from_secs(5), || {
            let text = std::fs::read_to_string(&path)?;
            let acquires: u64 = text
                .lines()
                .find(|l| l.starts_with("meta "))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Ok(text.contains("lockspace test:www") && acquires > 0)
        })
        .unwrap_or_else(|e| panic!("glstats of n{}: {e}", i + 1));
        eprintln!(
            "glstats n{}:\n{}",
            i + 1,
            std::fs::read_to_string(&path).unwrap_or_default()
        );
    }
    f.unmount_all_and_check_clean("at the end");
}

/// Record `k` of a node's fsync'd writes (`n3/file-k`).
fn record(k: usize) -> Vec<u8> {
    format!("fsynced record {k}\n").repeat(50).into_bytes()
}

/// Writes and fsyncs record `k` (run inside a node's worker).
fn write_record(k: usize) -> std::io::Result<()> {
    let mut fh = std::fs::File::create(p(&format!("n3/file-{k}")))?;
    fh.write_all(&record(k))?;
    fh.sync_all()
}

/// After n3 is gone: a survivor logged the replay of its journal, and records `0..fsynced`
/// read back exactly on both survivors.
fn assert_survivors_have_records(f: &FsCluster, fsynced: usize, when: &str) {
    // The survivor logs "journal recovered" after recovery-done reached the lock manager,
    // which already lets writes resume: the line may come a moment after them.
    let logged = f.c.wait_for(std::time::Duration::from_secs(15), || {
        Ok(format!("{}{}", f.c.log(0, "fs"), f.c.log(1, "fs")).contains("journal recovered"))
    });
    let logs = format!("{}{}", f.c.log(0, "fs"), f.c.log(1, "fs"));
    assert!(logged.is_ok(), "no recovery logged:\n{logs}");
    for i in 0..2 {
        let missing = f.w(i).run(move || {
            (0..fsynced)
                .filter(|&k| {
                    std::fs::read(p(&format!("n3/file-{k}"))).map_or(true, |d| d != record(k))
                })
                .count()
        });
        assert_eq!(
            missing,
            0,
            "n{}: files n3 fsync'd {when} are missing or wrong",
            i + 1
        );
    }
}

fn statvfs_free_blocks(path: &str) -> u64 {
    let c = std::ffi::CString::new(path).expect("no NUL");
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {path}: {}", std::io::Error::last_os_error());
    st.f_bfree as u64
}

/// What the tree should look like: path -> file contents (None for a directory).
type Model = std::collections::BTreeMap<String, Option<Vec<u8>>>;

fn tree(root: &str) -> Model {
    let mut out = Model::new();
    let mut stack = vec![root.to_string()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let path = e.path().display().to_string();
            let rel = path[root.len() + 1..].to_string();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, None);
                stack.push(path);
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

#[test]
fn random_operations_on_random_nodes_match_a_model_read_from_another_node() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let ops: usize = std::env::var("TANDEM_FS_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed: u64 = std::env::var("TANDEM_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7a4d);
    eprintln!("model test: {ops} operations, seed {seed} (TANDEM_SIM_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = FsCluster::start_mounted(3).unwrap();
    let mut model = Model::new();
    let dirs = ["", "a", "b", "a/c"];
    for k in 0..ops {
        let node = rng.gen_range(0..3usize);
        let dir = dirs[rng.gen_range(0..dirs.len())];
        let dir_exists = dir.is_empty() || model.get(dir) == Some(&None);
        let name = format!("f{}", rng.gen_range(0..6));
        let file = if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        };
        let files: Vec<String> = model
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let pick = |rng: &mut StdRng| files.get(rng.gen_range(0..files.len().max(1))).cloned();
        let what = rng.gen_range(0..100);
        let desc;
        match what {
            0..=24 if dir_exists => {
                // Write random bytes at a random offset (creating the file if needed).
                let len = rng.gen_range(1..20_000usize);
                let off = rng.gen_range(0..30_000u64);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let (path, d2) = (p(&file), data.clone());
                f.w(node)
                    .run(move || {
                        let fh = std::fs::OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .write(true)
                            .open(&path)?;
                        fh.write_all_at(&d2, off)
                    })
                    .unwrap();
                let cur = model.entry(file.clone()).or_insert(Some(Vec::new()));
                let v = cur.as_mut().unwrap();
                let end = off as usize + len;
                if v.len() < end {
                    v.resize(end, 0);
                }
                v[off as usize..end].copy_from_slice(&data);
                desc = format!("write {file} @{off}+{len}");
            }
            25..=39 if dir_exists => {
                let len = rng.gen_range(1..5000usize);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let (path, d2) = (p(&file), data.clone());
                f.w(node)
                    .run(move || {
                        let mut fh = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)?;
                        fh.write_all(&d2)
                    })
                    .unwrap();
                model
                    .entry(file.clone())
                    .or_insert(Some(Vec::new()))
                    .as_mut()
                    .unwrap()
                    .extend_from_slice(&data);
                desc = format!("append {file} +{len}");
            }
            40..=49 => {
                let Some(t) = pick(&mut rng) else { continue };
                let size = rng.gen_range(0..40_000u64);
                let path = p(&t);
                f.w(node)
                    .run(move || {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&path)?
                            .set_len(size)
                    })
                    .unwrap();
                model
                    .get_mut(&t)
                    .unwrap()
                    .as_mut()
                    .unwrap()
                    .resize(size as usize, 0);
                desc = format!("truncate {t} {size}");
            }
            50..=64 if dir_exists => {
                let Some(src) = pick(&mut rng) else { continue };
                if src == file || model.get(&file) == Some(&None) {
                    continue;
                }
                let (a, b) = (p(&src), p(&file));
                f.w(node).run(move || std::fs::rename(&a, &b)).unwrap();
                let v = model.remove(&src).unwrap();
                model.insert(file.clone(), v);
                desc = format!("rename {src} -> {file}");
            }
            65..=77 => {
                let Some(t) = pick(&mut rng) else { continue };
                let path = p(&t);
                f.w(node).run(move || std::fs::remove_file(&path)).unwrap();
                model.remove(&t);
                desc = format!("unlink {t}");
            }
            78..=87 => {
                // mkdir a tree, or remove a whole subtree.
                let d = ["a", "b", "a/c"][rng.gen_range(0..3)];
                if model.contains_key(d) {
                    let path = p(d);
                    f.w(node)
                        .run(move || std::fs::remove_dir_all(&path))
                        .unwrap();
                    model.retain(|k, _| k != d && !k.starts_with(&format!("{d}/")));
                    desc = format!("rm -r {d}");
                } else {
                    let parent_ok = !d.contains('/') || model.get("a") == Some(&None);
                    if !parent_ok {
                        continue;
                    }
                    let path = p(d);
                    f.w(node).run(move || std::fs::create_dir(&path)).unwrap();
                    model.insert(d.to_string(), None);
                    desc = format!("mkdir {d}");
                }
            }
            _ => {
                let Some(t) = pick(&mut rng) else { continue };
                let mode = [0o600, 0o644, 0o640, 0o755][rng.gen_range(0..4)];
                let path = p(&t);
                f.w(node)
                    .run(move || {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    })
                    .unwrap();
                let other = (node + rng.gen_range(1..3)) % 3;
                let path = p(&t);
                let got = f
                    .w(other)
                    .run(move || std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o7777))
                    .unwrap();
                assert_eq!(
                    got,
                    mode,
                    "op {k}: chmod {t} on n{} seen on n{}",
                    node + 1,
                    other + 1
                );
                continue;
            }
        }
        // After each operation, another node sees exactly the model: the touched file at
        // once, the whole tree every 25 operations.
        let other = (node + rng.gen_range(1..3)) % 3;
        let path = p(&file);
        let seen = f.w(other).run(move || std::fs::read(&path).ok());
        if let Some(Some(want)) = model.get(&file) {
            assert!(
                seen.as_ref() == Some(want),
                "op {k} ({desc}) on n{}: n{} reads {file} wrong ({:?} bytes, want {})",
                node + 1,
                other + 1,
                seen.as_ref().map(Vec::len),
                want.len()
            );
        }
        if k % 25 == 0 || k + 1 == ops {
            let got = f.w(other).run(|| tree(MNT));
            if got != model {
                let a: Vec<_> = got.keys().collect();
                let b: Vec<_> = model.keys().collect();
                panic!("op {k} ({desc}): n{} sees {a:?}, model {b:?}", other + 1);
            }
        }
    }
    f.unmount_all_and_check_clean("after the model run");
}

#[test]
fn all_nodes_create_and_delete_in_one_directory_and_append_to_one_file() {
    let mut f = FsCluster::start_mounted(3).unwrap();
    f.w(0).run(|| std::fs::create_dir(p("shared"))).unwrap();
    let per_node = 150usize;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let w = f.workers[i].take().unwrap();
            std::thread::spawn(move || {
                w.run(move || {
                    for k in 0..per_node {
                        std::fs::write(p(&format!("shared/n{i}-{k}")), format!("{i}:{k}")).unwrap();
                        if k % 3 == 0 {
                            std::fs::remove_file(p(&format!("shared/n{i}-{k}"))).unwrap();
                        }
                        // O_APPEND records from every node into one log.
                        let mut log = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(p("shared.log"))
                            .unwrap();
                        log.write_all(format!("n{i} record {k:04}\n").as_bytes())
                            .unwrap();
                    }
                });
                w
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        f.workers[i] = Some(h.join().unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "3 nodes, one directory: {:.0} creates+appends/s aggregate",
        (3 * per_node) as f64 / secs
    );
    for i in 0..3 {
        let mut names = f.w(i).run(|| {
            std::fs::read_dir(p("shared"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect::<Vec<_>>()
        });
        names.sort();
        let mut want: Vec<String> = (0..3)
            .flat_map(|n| {
                (0..per_node)
                    .filter(|k| k % 3 != 0)
                    .map(move |k| format!("n{n}-{k}"))
            })
            .collect();
        want.sort();
        assert_eq!(names, want, "directory as seen on n{}", i + 1);
        let log = f
            .w(i)
            .run(|| std::fs::read_to_string(p("shared.log")).unwrap());
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 3 * per_node, "appended records on n{}", i + 1);
        let mut uniq: Vec<&str> = lines.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 3 * per_node, "overlapping appends");
        assert!(lines.iter().all(|l| l.len() == 14), "torn record in {log}");
    }
    f.unmount_all_and_check_clean("at the end");
}

#[test]
fn kill9_of_a_nodes_whole_stack_during_writes_survivors_replay_its_journal() {
    let mut f = FsCluster::start_mounted(3).unwrap();
    f.w(0).run(|| std::fs::create_dir(p("n3"))).unwrap();
    // n3 writes and fsyncs files until it dies; `done` counts the fsync'd ones.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w3 = f.workers[2].take().unwrap();
    let d2 = done.clone();
    let writer = std::thread::spawn(move || {
        w3.run(move || {
            for k in 0.. {
                if write_record(k).is_err() {
                    return;
                }
                d2.store(k + 1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        w3
    });
    // Survivors keep working meanwhile.
    for k in 0..20 {
        let i = k % 2;
        f.w(i)
            .run(move || std::fs::write(p(&format!("survivor-{k}")), b"x"))
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        done.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "n3 wrote nothing"
    );
    f.c.kill9(2);
    let fsynced = done.load(std::sync::atomic::Ordering::SeqCst);
    let _ = writer.join();
    // A write on a survivor waits (it does not fail) until a survivor has replayed the
    // dead node's journal and the lock manager purged its locks.
    let t0 = Instant::now();
    f.w(0)
        .run(|| std::fs::write(p("after-kill"), b"still here"))
        .unwrap();
    let blocked = t0.elapsed();
    eprintln!("kill -9 of n3 -> survivors accept writes again after {blocked:?} ({fsynced} files fsync'd by n3)");
    assert_survivors_have_records(&f, fsynced, "before it died");
    for i in 0..2 {
        assert_eq!(
            f.w(i).run(|| std::fs::read(p("after-kill")).unwrap()),
            b"still here"
        );
    }
    f.unmount_all_and_check_clean("after recovery");
}

/// Every node reads (all hold `meta` PR), one dies holding it: a survivor's write converts
/// its PR to EX, which waits for the orphan, while its own recovery thread waits for that
/// PR to take `meta` EX for the replay. The lock manager fails the conversion (deadlock);
/// the survivor gives its PR back, the replay runs, and the write completes. (The seed
/// scenario: web servers on every node, one killed, a survivor writes.)
#[test]
fn kill9_of_a_reader_while_every_node_reads_then_a_survivor_writes() {
    let mut f = FsCluster::start_mounted(3).unwrap();
    f.w(0)
        .run(|| std::fs::write(p("page.html"), b"<p>shared</p>"))
        .unwrap();
    for i in [1, 2, 0] {
        let got = f.w(i).run(|| std::fs::read(p("page.html")).unwrap());
        assert_eq!(got, b"<p>shared</p>");
    }
    f.c.kill9(2);
    drop(f.workers[2].take()); // n3's mount is gone with it
    let t0 = Instant::now();
    let w0 = f.workers[0].take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let r = w0.run(|| {
            std::fs::write(p("after-kill.html"), b"<p>written by n1</p>")?;
            std::fs::File::open(p("after-kill.html"))?.sync_all()
        });
        let _ = tx.send(r.map_err(|e| e.to_string()));
        w0
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(r) => r.unwrap(),
        Err(_) => panic!(
            "n1's write after the kill of n3 did not finish in 60 s (recovery deadlock?)\n{}",
            f.c.log(0, "fs")
        ),
    }
    f.workers[0] = Some(writer.join().unwrap());
    eprintln!(
        "kill -9 of a reading n3 -> n1's write done after {:?}",
        t0.elapsed()
    );
    let got = f.w(1).run(|| std::fs::read(p("after-kill.html")).unwrap());
    assert_eq!(got, b"<p>written by n1</p>");
    f.unmount_all_and_check_clean("after recovery");
}

/// A node dies with a file open that another node has unlinked: nobody will ever close
/// it, so a survivor frees it once it has recovered the dead node's journal (without
/// that its blocks stay in use until an offline fsck).
#[test]
fn a_file_unlinked_while_open_on_a_node_that_dies_is_freed_after_recovery() {
    let mut f = FsCluster::start_mounted(3).unwrap();
    let free_blocks = |f: &FsCluster| f.w(0).run(|| statvfs_free_blocks(MNT));
    let before = free_blocks(&f);
    f.w(0)
        .run(|| std::fs::write(p("open-on-n3"), vec![9u8; 4 << 20]))
        .unwrap();
    let fh = f.w(2).run(|| std::fs::File::open(p("open-on-n3"))).unwrap();
    f.w(0)
        .run(|| std::fs::remove_file(p("open-on-n3")))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        free_blocks(&f) + 512 < before,
        "the unlinked file is still open on n3: its 4 MiB stay in use"
    );
    f.c.kill9(2);
    drop(fh);
    drop(f.workers[2].take());
    f.c.wait_for(std::time::Duration::from_secs(60), || {
        Ok(free_blocks(&f) + 16 >= before)
    })
    .unwrap_or_else(|e| {
        panic!(
            "the file n3 had open when it died was not freed after recovery: {e} ({} free blocks, {before} before)\n{}",
            free_blocks(&f),
            f.c.log(0, "fs")
        )
    });
    f.unmount_all_and_check_clean("after the sweep");
}

/// A node cut off the network (not killed) while it holds its locks and has written: its
/// lock manager fences itself, its mount withdraws (its next write fails, nothing hangs),
/// the survivors replay its journal and carry on with every file it fsync'd; healed and
/// remounted, it sees what they wrote meanwhile.
///
/// n3 is idle at the instant of the cut: a replicated write in flight then, acknowledged
/// by one survivor and not the other, would leave the survivors different in that block —
/// the known multi-node gap that DRBD 9 closes with peer-acks (docs/SEMANTICS.md).
#[test]
fn a_node_cut_off_withdraws_and_the_survivors_carry_on() {
    let mut f = FsCluster::start_mounted(3).unwrap();
    f.w(0).run(|| std::fs::create_dir(p("n3"))).unwrap();
    let fsynced = 40;
    f.w(2)
        .run(move || -> std::io::Result<()> { (0..fsynced).try_for_each(write_record) })
        .unwrap();
    let t0 = Instant::now();
    f.c.net.cut(2).unwrap();
    // n3's next write fails (EIO once the mount withdraws); it must not hang.
    let w3 = f.workers[2].take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let r = w3.run(|| -> std::io::Result<()> {
            let mut fh = std::fs::File::create(p("n3/after-cut"))?;
            fh.write_all(b"must not survive")?;
            fh.sync_all()
        });
        let _ = tx.send(r.map_err(|e| e.to_string()));
        w3
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(90))
        .unwrap_or_else(|_| {
            panic!(
                "n3's write did not end within 90 s of the cut (hung?)\n{}",
                f.c.log(2, "fs")
            )
        });
    f.workers[2] = Some(writer.join().unwrap());
    let err = r.expect_err("a write on a node cut off from the cluster succeeded");
    eprintln!("cut n3 -> its write fails after {:?} ({err})", t0.elapsed());
    // The survivors write again once n3's journal is replayed.
    f.w(0)
        .run(|| std::fs::write(p("after-cut"), b"written while n3 was cut off"))
        .unwrap();
    eprintln!("cut n3 -> n1 writes again after {:?}", t0.elapsed());
    assert_survivors_have_records(&f, fsynced, "before the cut");
    // Healed: n3's withdrawn mount unmounts, its volume resyncs from the majority, and a
    // new mount sees the survivors' writes.
    f.c.net.heal(2).unwrap();
    f.unmount(2)
        .unwrap_or_else(|e| panic!("unmount of the withdrawn n3: {e}\n{}", f.c.log(2, "fs")));
    f.c.wait_sync_all(RES, 120).unwrap_or_else(|e| {
        panic!(
            "n3's volume did not resync after the heal: {e}\n--- n1 replicator\n{}\n--- n3 replicator\n{}",
            f.c.log(0, "replicator"),
            f.c.log(2, "replicator")
        )
    });
    f.mount(2).unwrap();
    assert_eq!(
        f.w(2).run(|| std::fs::read(p("after-cut")).unwrap()),
        b"written while n3 was cut off"
    );
    f.unmount_all_and_check_clean("after the cut, recovery and remount");
}

#[test]
fn unmount_and_remount_one_node_while_the_others_keep_writing() {
    let mut f = FsCluster::start_mounted(3).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (1..3)
        .map(|i| {
            let w = f.workers[i].take().unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let n = w.run(move || {
                    let mut k = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::fs::write(p(&format!("w{i}-{k}")), format!("{i}/{k}")).unwrap();
                        k += 1;
                    }
                    k
                });
                (w, n)
            })
        })
        .collect();
    for _ in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        f.unmount(0).unwrap();
        f.mount(0).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut counts = Vec::new();
    for (j, h) in writers.into_iter().enumerate() {
        let (w, n) = h.join().unwrap();
        f.workers[j + 1] = Some(w);
        counts.push(n);
    }
    // The remounted node sees every file the others wrote.
    for (j, n) in counts.iter().enumerate() {
        let i = j + 1;
        let n = *n;
        let bad = f.w(0).run(move || {
            (0..n)
                .filter(|k| {
                    std::fs::read_to_string(p(&format!("w{i}-{k}"))).ok()
                        != Some(format!("{i}/{k}"))
                })
                .count()
        });
        assert_eq!(bad, 0, "files of n{} wrong on the remounted n1", i + 1);
    }
    f.unmount_all_and_check_clean("at the end");
}

/// iopen locks of closed files stay cached, but at most `MAX_IDLE` (4096) of them per
/// mount: past that the oldest go back to the lock manager (GFS2 keeps its iopen glocks
/// in a bounded LRU too). Seen both in the mount's glstats and in the lock table.
#[test]
fn idle_iopen_locks_beyond_the_cache_limit_are_given_back() {
    let mut f = FsCluster::start(2, 0).unwrap();
    f.mount(0).unwrap();
    f.mount(1).unwrap();
    // A node takes the iopen locks of the files it has open when it hands `meta` over:
    // n1 keeps batches of files open while n2 writes, then closes them (cached, idle).
    let files = 4600;
    f.w(0).run(|| std::fs::create_dir(p("many"))).unwrap();
    for batch in 0..10 {
        let open = f
            .w(0)
            .run(move || -> std::io::Result<Vec<std::fs::File>> {
                (batch * files / 10..(batch + 1) * files / 10)
                    .map(|k| {
                        let path = p(&format!("many/f{k}"));
                        std::fs::write(&path, b"x")?;
                        std::fs::File::open(&path)
                    })
                    .collect()
            })
            .unwrap();
        f.w(1)
            .run(move || std::fs::write(p(&format!("poke-{batch}")), b"y"))
            .unwrap();
        f.w(0).run(move || drop(open));
    }
    let iopen_held_by = |f: &FsCluster, node: usize| -> usize {
        let out = f.c.lockctl(node, &["locks", "test:www", "--json"]).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let me = node as u64 + 1;
        v.as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                let name: Vec<u8> = r["name"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                name.starts_with(b"iopen/")
            })
            .flat_map(|r| r["granted"].as_array().unwrap().clone())
            .filter(|l| l["owner"]["node"].as_u64() == Some(me))
            .count()
    };
    // The last closes (RELEASE follows close(2) in the background) and the unlocks of
    // the evicted locks may still be on their way.
    let mut held = iopen_held_by(&f, 0);
    let t0 = std::time::Instant::now();
    while held > 4096 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(200));
        held = iopen_held_by(&f, 0);
    }
    eprintln!("n1 holds {held} iopen locks after creating {files} files");
    assert!(
        (1..=4096).contains(&held),
        "n1 holds {held} iopen locks (cache limit 4096)"
    );
    // The mount's operator view agrees: nothing open, at most 4096 idle.
    let line = glstats_line(&f, 0, "iopen PR:").expect("an iopen line in n1's glstats");
    let idle: usize = line
        .split(',')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line}"));
    assert!(idle <= 4096, "{line}");
    // Files whose lock was given back still work from both nodes, and n2 can delete
    // them (its EX NOQUEUE on iopen is granted at once, nothing to call back).
    for i in 0..2 {
        let n = f
            .w(i)
            .run(|| std::fs::read(p("many/f0")))
            .unwrap_or_else(|e| panic!("n{}: {e}", i + 1));
        assert_eq!(n, b"x");
    }
    f.w(1)
        .run(move || -> std::io::Result<()> {
            for k in 0..100 {
                std::fs::remove_file(p(&format!("many/f{k}")))?;
            }
            Ok(())
        })
        .unwrap();
    f.unmount_all_and_check_clean("after the iopen eviction");
}

/// A first open does not wait for its iopen lock (the request goes out and the open goes
/// on), but a hand-off of `meta` waits for it: a deleter elsewhere must still see the file
/// open. Every iopen request is held back 300 ms here to make the window wide; the
/// deleter then writes a file that would reuse freed blocks.
#[test]
fn an_unlink_elsewhere_right_after_an_open_still_sees_the_file_open() {
    let mut f = FsCluster::start(2, 0).unwrap();
    f.c.set_env("TANDEM_FAULT_IOPEN_DELAY_MS", "300");
    f.mount(0).unwrap();
    f.mount(1).unwrap();
    for round in 0..3 {
        let name = format!("opened-{round}");
        let n = name.clone();
        f.w(0)
            .run(move || std::fs::write(p(&n), vec![9u8; 40_000]))
            .unwrap();
        let n = name.clone();
        let fh = std::sync::Arc::new(f.w(1).run(move || std::fs::File::open(p(&n))).unwrap());
        let n = name.clone();
        f.w(0)
            .run(move || -> std::io::Result<()> {
                std::fs::remove_file(p(&n))?;
                std::fs::write(p(&format!("filler-{round}")), vec![1u8; 200_000])
            })
            .unwrap();
        let data = read_on(&f, 1, &fh, 40_000).unwrap_or_else(|e| {
            panic!("round {round}: the file open on n2 became unreadable: {e}")
        });
        assert!(
            data.iter().all(|b| *b == 9),
            "round {round}: the file open on n2 was freed under it (its blocks were reused)"
        );
        drop(fh);
    }
    f.unmount_all_and_check_clean("after unlinks of files just opened elsewhere");
}

/// The first `len` bytes of the file `fh` (open on `node`), read on that node.
fn read_on(
    f: &FsCluster,
    node: usize,
    fh: &std::sync::Arc<std::fs::File>,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let g = fh.clone();
    f.w(node).run(move || {
        let mut b = vec![0u8; len];
        g.read_exact_at(&mut b, 0).map(|()| b)
    })
}

/// Lines of a node's glstats file that start with `prefix`.
fn glstats_line(f: &FsCluster, node: usize, prefix: &str) -> Option<String> {
    let dir = f.c.dir().join(format!("run/n{}", node + 1));
    let stats = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".glstats"))
        .and_then(|e| std::fs::read_to_string(e.path()).ok())?;
    stats
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_string)
}

/// While a node holds `meta` the kernel caches attributes and pages (fewer round trips
/// for web serving); before the glock goes, they are forgotten. Each round n2 reads the
/// file twice through new opens and stats it twice through a descriptor it keeps open
/// (`fstat` is answered from the kernel's attribute cache), then n1 changes it in a way
/// only a cache that is really dropped can show: same size with the old mtime put back
/// (like `cp -p` or `rsync -t`), and a new mode. n2 must see every change at once.
#[test]
fn kernel_caches_while_the_glock_is_held_and_forgets_before_it_goes() {
    let mut f = FsCluster::start(2, 0).unwrap();
    f.mount(0).unwrap();
    f.mount(1).unwrap();
    fn body(round: u32) -> Vec<u8> {
        format!("<p>round {round:06}</p>\n").into_bytes()
    }
    fn mode_of(round: u32) -> u32 {
        if round.is_multiple_of(3) {
            0o600
        } else {
            0o644
        }
    }
    let file = p("cached.html");
    let (f0, b0) = (file.clone(), body(0));
    f.w(0)
        .run(move || -> std::io::Result<()> {
            std::fs::write(&f0, b0)?;
            std::fs::set_permissions(&f0, std::fs::Permissions::from_mode(mode_of(0)))
        })
        .unwrap();
    let f1 = file.clone();
    let held = std::sync::Arc::new(f.w(1).run(move || std::fs::File::open(f1)).unwrap());
    let mut saw_cache = false;
    for round in 1..=30u32 {
        let (file2, held2) = (file.clone(), held.clone());
        let (got, modes) = f
            .w(1)
            .run(move || -> std::io::Result<(Vec<u8>, [u32; 2])> {
                // fstat first: a lookup by name would refresh the attributes anyway.
                let m1 = held2.metadata()?.permissions().mode() & 0o7777;
                let m2 = held2.metadata()?.permissions().mode() & 0o7777;
                let a = std::fs::read(&file2)?;
                let b = std::fs::read(&file2)?;
                assert_eq!(a, b);
                Ok((a, [m1, m2]))
            })
            .unwrap();
        assert_eq!(got, body(round - 1), "round {round}: n2 read stale data");
        let want = mode_of(round - 1);
        assert_eq!(modes, [want, want], "round {round}: n2 saw a stale mode");
        if !saw_cache {
            // The operator view shows the kernel holding attributes (glstats every 1 s).
            saw_cache = glstats_line(&f, 1, "kernel cache:")
                .is_some_and(|l| !l.contains("attributes of 0 inodes"));
        }
        // n1: rewrite in place (same size), put the old mtime back, set the mode.
        let (file1, new) = (file.clone(), body(round));
        f.w(0)
            .run(move || -> std::io::Result<()> {
                let old = std::fs::metadata(&file1)?.modified()?;
                let h = std::fs::OpenOptions::new().write(true).open(&file1)?;
                h.write_all_at(&new, 0)?;
                h.set_modified(old)?;
                drop(h);
                std::fs::set_permissions(&file1, std::fs::Permissions::from_mode(mode_of(round)))
            })
            .unwrap();
    }
    // Give the glstats writer (1 s period) a chance if the loop was quick.
    let t = Instant::now();
    while !saw_cache && t.elapsed() < std::time::Duration::from_secs(3) {
        let h = held.clone();
        let _ = f.w(1).run(move || h.metadata());
        saw_cache = glstats_line(&f, 1, "kernel cache:")
            .is_some_and(|l| !l.contains("attributes of 0 inodes"));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(saw_cache, "n2's kernel never cached any attributes");
    drop(held);
    f.unmount_all_and_check_clean("at the end");
}

/// Names are cached too while a node holds `meta` (Linux 6.16+: one
/// `FUSE_NOTIFY_INC_EPOCH` forgets them all before the glock goes). Each round n2 resolves
/// every path (its kernel caches the names), then n1 changes what those names mean: a file
/// renamed away and a new one created under its name, a directory replaced by a file and
/// back, a name removed. n2 must see each change at once, by path.
#[test]
fn kernel_caches_names_while_the_glock_is_held_and_forgets_them_before_it_goes() {
    /// What n2 sees: page.html, whether d is a directory, d/inner, whether "gone" exists.
    type Seen = (Vec<u8>, bool, Option<Vec<u8>>, bool);
    let mut f = FsCluster::start(2, 0).unwrap();
    f.mount(0).unwrap();
    f.mount(1).unwrap();
    let kernel_has_epoch = {
        let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = r
            .trim()
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 16)
    };
    let (page, dir, gone) = (p("page.html"), p("d"), p("gone"));
    {
        let (page, dir, gone) = (page.clone(), dir.clone(), gone.clone());
        f.w(0)
            .run(move || -> std::io::Result<()> {
                std::fs::write(&page, b"round 0")?;
                std::fs::create_dir(&dir)?;
                std::fs::write(format!("{dir}/inner"), b"inner 0")?;
                std::fs::write(&gone, b"here")
            })
            .unwrap();
    }
    let mut saw_names_cached = false;
    for round in 1..=20u32 {
        // n2 resolves every name twice (the second time from its kernel's cache).
        let (pg, d, g) = (page.clone(), dir.clone(), gone.clone());
        let want_dir = round % 2 == 1;
        let seen = f
            .w(1)
            .run(move || -> std::io::Result<Seen> {
                let a = std::fs::read(&pg)?;
                assert_eq!(a, std::fs::read(&pg)?);
                let is_dir = std::fs::metadata(&d)?.is_dir();
                let inner = if is_dir {
                    Some(std::fs::read(format!("{d}/inner"))?)
                } else {
                    None
                };
                let gone_exists = std::path::Path::new(&g).exists();
                Ok((a, is_dir, inner, gone_exists))
            })
            .unwrap();
        let expect_page = format!("round {}", round - 1).into_bytes();
        assert_eq!(
            seen.0, expect_page,
            "round {round}: n2 resolved a stale name"
        );
        assert_eq!(seen.1, want_dir, "round {round}: d is stale on n2");
        if want_dir {
            let want = format!("inner {}", round - 1).into_bytes();
            assert_eq!(seen.2, Some(want), "round {round}: d/inner is stale on n2");
        }
        assert_eq!(
            seen.3,
            round % 4 != 0,
            "round {round}: 'gone' is stale on n2"
        );
        if !saw_names_cached {
            saw_names_cached =
                glstats_line(&f, 1, "kernel cache:").is_some_and(|l| l.ends_with("names cached"));
        }
        // n1 changes what every name means.
        let (pg, d, g) = (page.clone(), dir.clone(), gone.clone());
        f.w(0)
            .run(move || -> std::io::Result<()> {
                std::fs::rename(&pg, format!("{pg}.old-{round}"))?;
                std::fs::write(&pg, format!("round {round}"))?;
                if want_dir {
                    std::fs::remove_file(format!("{d}/inner"))?;
                    std::fs::remove_dir(&d)?;
                    std::fs::write(&d, b"now a file")?;
                } else {
                    std::fs::remove_file(&d)?;
                    std::fs::create_dir(&d)?;
                    std::fs::write(format!("{d}/inner"), format!("inner {round}"))?;
                }
                if (round + 1) % 4 == 0 {
                    std::fs::remove_file(&g)
                } else {
                    std::fs::write(&g, b"here")
                }
            })
            .unwrap();
    }
    let t = Instant::now();
    while kernel_has_epoch && !saw_names_cached && t.elapsed() < std::time::Duration::from_secs(3) {
        let pg = page.clone();
        let _ = f.w(1).run(move || std::fs::metadata(pg));
        saw_names_cached =
            glstats_line(&f, 1, "kernel cache:").is_some_and(|l| l.ends_with("names cached"));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if kernel_has_epoch {
        assert!(
            saw_names_cached,
            "n2's kernel never cached names on Linux 6.16+"
        );
    }
    f.unmount_all_and_check_clean("at the end");
}

/// setxattr(system.posix_acl_access) of u::rw-,u:UID:r--,g::---,m::r--,o::--- (mode 0640
/// whichever UID is named): 0 or the errno.
fn set_acl_naming(path: &str, uid: u32) -> i32 {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, uid),
        (4, 0, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of v.len() bytes.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            v.as_ptr().cast(),
            v.len(),
            0,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// With `-o acl` each node's kernel enforces POSIX ACLs and caches them with no lifetime,
/// so a node must forget them before its glock goes, like attributes. n1 names uid 1000 and
/// uid 1001 in turn in the file's ACL (the mode stays 0640, so only the ACL tells); n2
/// reads as uid 1000 after every change and must be let in exactly when the ACL names it.
#[test]
fn posix_acls_are_enforced_on_every_node_and_never_stale() {
    let mut f = FsCluster::start(2, 0).unwrap();
    f.mount_with(0, "acl,allow_other").unwrap();
    f.mount_with(1, "acl,allow_other").unwrap();
    let file = p("acl.html");
    let f0 = file.clone();
    f.w(0)
        .run(move || -> std::io::Result<()> {
            std::fs::write(&f0, b"members only")?;
            std::fs::set_permissions(&f0, std::fs::Permissions::from_mode(0o600))
        })
        .unwrap();
    for round in 0..20u32 {
        let named = if round % 2 == 0 { 1000 } else { 1001 };
        let f1 = file.clone();
        assert_eq!(f.w(0).run(move || set_acl_naming(&f1, named)), 0);
        let f2 = file.clone();
        let (mode, reads) = f.w(1).run(move || {
            /// Puts the worker thread's filesystem ids back, even if the body panics.
            struct Root;
            impl Drop for Root {
                fn drop(&mut self) {
                    // SAFETY: changes only this thread's filesystem ids.
                    unsafe {
                        libc::setfsuid(0);
                        libc::setfsgid(0);
                    }
                }
            }
            let mode = std::fs::metadata(&f2).map(|m| m.permissions().mode() & 0o777);
            let _root = Root;
            // SAFETY: changes only this thread's filesystem ids.
            unsafe {
                libc::setfsgid(1000);
                libc::setfsuid(1000);
            }
            // Twice: the second check is answered from the kernel's ACL cache.
            let reads: Vec<bool> = (0..2).map(|_| std::fs::read(&f2).is_ok()).collect();
            (mode.ok(), reads)
        });
        assert_eq!(mode, Some(0o640), "round {round}");
        assert_eq!(
            reads,
            [named == 1000, named == 1000],
            "round {round}: n2 enforced a stale ACL (uid {named} is named)"
        );
    }
    f.unmount_all_and_check_clean("after the ACL rounds");
}

/// flock(2) on a descriptor: 0 or the errno.
fn flock(fd: &std::fs::File, op: i32) -> i32 {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor.
    if unsafe { libc::flock(fd.as_raw_fd(), op) } == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Retries a non-blocking flock for up to `secs` (a close's release reaches the daemon
/// after close(2) returns; a dead node's locks go after its recovery).
fn flock_within(fd: &std::fs::File, op: i32, secs: u64) -> i32 {
    let t = Instant::now();
    loop {
        let r = flock(fd, op | libc::LOCK_NB);
        if r != libc::EWOULDBLOCK || t.elapsed() > std::time::Duration::from_secs(secs) {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// flock(2) is cluster-wide, as on GFS2: processes on different nodes (and different open
/// files on one node) exclude each other, a blocked LOCK_EX waits for the holder on
/// another node, conversions behave as on Linux, a close releases, and a dead node's
/// locks go once a survivor has recovered it.
#[test]
fn flock_excludes_processes_on_other_nodes_and_a_dead_nodes_locks_go_after_recovery() {
    use libc::{LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN};
    let mut f = FsCluster::start_mounted(3).unwrap();
    let file = p("lockfile");
    let f0 = file.clone();
    f.w(0).run(move || std::fs::write(f0, b"")).unwrap();
    let open = |f: &FsCluster, i: usize| {
        let path = file.clone();
        f.w(i)
            .run(move || std::fs::File::options().read(true).open(path))
            .unwrap()
    };
    // Descriptors are process-wide: flock on them works from any thread.
    let (a, b, b2) = (open(&f, 0), open(&f, 1), open(&f, 1));
    assert_eq!(flock(&a, LOCK_EX), 0);
    assert_eq!(flock(&b, LOCK_EX | LOCK_NB), libc::EWOULDBLOCK);
    assert_eq!(flock(&b, LOCK_SH | LOCK_NB), libc::EWOULDBLOCK);

    // A blocking LOCK_EX on n2 waits until n1 unlocks.
    let b = std::sync::Arc::new(b);
    let bw = b.clone();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        (flock(&bw, LOCK_EX), t.elapsed())
    });
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(!waiter.is_finished(), "n2's LOCK_EX did not wait for n1's");
    assert_eq!(flock(&a, LOCK_UN), 0);
    let (r, waited) = waiter.join().unwrap();
    assert_eq!(r, 0);
    assert!(
        waited >= std::time::Duration::from_millis(500),
        "{waited:?}"
    );
    assert!(waited < std::time::Duration::from_secs(10), "{waited:?}");
    assert_eq!(flock(&a, LOCK_SH | LOCK_NB), libc::EWOULDBLOCK);
    assert_eq!(
        flock(&b2, LOCK_EX | LOCK_NB),
        libc::EWOULDBLOCK,
        "another open file on the same node is another owner"
    );

    // Downgrade, share, and a failed upgrade drops the shared lock (as on Linux).
    assert_eq!(flock(&b, LOCK_SH), 0);
    assert_eq!(flock(&a, LOCK_SH | LOCK_NB), 0);
    assert_eq!(flock(&b2, LOCK_SH | LOCK_NB), 0);
    assert_eq!(flock(&a, LOCK_EX | LOCK_NB), libc::EWOULDBLOCK);
    assert_eq!(
        flock(&b2, LOCK_EX | LOCK_NB),
        libc::EWOULDBLOCK,
        "n1 no longer holds LOCK_SH, but b still does"
    );

    // Closing releases: n1 gets LOCK_EX once n2's files are closed.
    drop(b2);
    drop(std::sync::Arc::try_unwrap(b).unwrap());
    assert_eq!(flock_within(&a, LOCK_EX, 5), 0);
    assert_eq!(flock(&a, LOCK_UN), 0);
    let stats = glstats_line(&f, 0, "flock:");
    assert!(stats.is_some(), "glstats shows flocks");

    // Threads sharing one open file, all at once: one lock for that file, none leaked.
    let e = std::sync::Arc::new(open(&f, 1));
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let e = e.clone();
            std::thread::spawn(move || flock(&e, LOCK_SH | LOCK_NB))
        })
        .collect();
    for r in racers {
        assert_eq!(r.join().unwrap(), 0);
    }
    drop(std::sync::Arc::try_unwrap(e).unwrap());
    assert_eq!(flock_within(&a, LOCK_EX, 5), 0, "a shared lock leaked");

    // A signal interrupts a blocked LOCK_EX as on a local filesystem: the handler runs and,
    // without SA_RESTART, flock returns EINTR.
    extern "C" fn on_usr1(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing, for a signal this test sends itself.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let d = open(&f, 1);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (res_tx, res_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = res_tx.send(flock(&d, LOCK_EX));
    });
    let tid = tid_rx.recv().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(res_rx.try_recv().is_err(), "n2's LOCK_EX did not wait");
    // SAFETY: signals one of this process's own threads.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
    assert_eq!(
        res_rx.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(libc::EINTR),
        "a signal must end a blocked flock"
    );

    // kill -9 of a process blocked in flock(1) ends it at once.
    let path = file.clone();
    let mut child = f
        .w(1)
        .run(move || {
            std::process::Command::new("flock")
                .arg(path)
                .arg("true")
                .spawn()
        })
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "flock(1) did not wait for n1"
    );
    child.kill().unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "a process blocked in flock could not be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(flock(&a, LOCK_UN), 0);

    // n3 dies holding LOCK_EX: its lock stays until a survivor has recovered n3.
    let c = open(&f, 2);
    assert_eq!(flock(&c, LOCK_EX), 0);
    assert_eq!(flock(&a, LOCK_EX | LOCK_NB), libc::EWOULDBLOCK);
    f.c.kill9(2);
    drop(f.workers[2].take());
    drop(c); // its connection died with the mount: the close reaches no one
    let t0 = Instant::now();
    assert_eq!(
        flock_within(&a, LOCK_EX, 60),
        0,
        "n3's flock outlived its recovery\n{}",
        f.c.log(0, "fs")
    );
    eprintln!(
        "kill -9 of n3 -> its flock released after {:?}",
        t0.elapsed()
    );
    assert_eq!(flock(&a, LOCK_UN), 0);
    drop(a);
    f.unmount_all_and_check_clean("after the flock rounds");
}

/// The filesystem keeps working on a node whose replicated disk is being resynced under
/// it (DRBD serves a Primary that is SyncTarget through its peer; so do we): n1's volume
/// is invalidated while it writes files, the whole volume comes back from n2 at 32 MiB/s,
/// and n1 never sees an error. Every file is then right on both nodes and fsck is clean.
#[test]
fn a_mounted_node_keeps_writing_while_its_volume_resyncs_from_a_peer() {
    let mut f = FsCluster::start_with(2, 0, None, "resync-rate = \"32MiB\"\n").unwrap();
    f.mount(0).unwrap();
    f.mount(1).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = f.workers[0].take().unwrap();
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            w.run(move || {
                std::fs::create_dir_all(p("rs")).unwrap();
                let mut k = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let path = p(&format!("rs/f{k}"));
                    std::fs::write(&path, record(k)).unwrap();
                    assert_eq!(std::fs::read(&path).unwrap(), record(k), "{path} read back");
                    k += 1;
                    written.store(k, std::sync::atomic::Ordering::Relaxed);
                }
            });
            w
        })
    };
    while written.load(std::sync::atomic::Ordering::Relaxed) < 20 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    f.c.adm(0, &["invalidate", RES]).unwrap();
    let repl = |f: &FsCluster| {
        f.c.status_json(0).unwrap()[0]["connections"][0]["replication-state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    f.c.wait_for(std::time::Duration::from_secs(10), || {
        Ok(repl(&f) == "SyncTarget")
    })
    .expect("n1 never became SyncTarget");
    let at_start = written.load(std::sync::atomic::Ordering::Relaxed);
    f.c.adm(0, &["wait-sync", RES, "--timeout-s", "60"])
        .unwrap();
    let during = written.load(std::sync::atomic::Ordering::Relaxed) - at_start;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    f.workers[0] = Some(
        writer
            .join()
            .expect("the writer on n1 failed during the resync"),
    );
    assert!(
        during >= 20,
        "only {during} files written on n1 while it was SyncTarget"
    );
    let n = written.load(std::sync::atomic::Ordering::Relaxed);
    for node in 0..2 {
        let bad = f.w(node).run(move || {
            (0..n)
                .filter(|&k| std::fs::read(p(&format!("rs/f{k}"))).ok() != Some(record(k)))
                .count()
        });
        assert_eq!(bad, 0, "files wrong on n{} after the resync", node + 1);
    }
    f.unmount_all_and_check_clean("after a resync under a mounted node");
}
