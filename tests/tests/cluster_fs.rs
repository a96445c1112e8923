//! The cluster filesystem across real processes: 3 nodes in network namespaces (lockd +
//! dual-primary replicator each), `lock_tandem` mounted at each node's own
//! `/var/www/html` in its own mount namespace.

use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use tandem_tests::fscluster::{FsCluster, MNT};

fn p(rel: &str) -> String {
    format!("{MNT}/{rel}")
}

#[test]
fn close_on_one_node_is_seen_by_open_stat_readdir_read_on_the_others() {
    let mut f = FsCluster::start(3, 0).unwrap();
    for i in 0..3 {
        f.mount(i).unwrap();
    }
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
    let mut buf = [0u8; 14];
    let g = f2.clone();
    let n = f.w(1).run(move || g.read_at(&mut [0u8; 14], 0)).unwrap();
    assert_eq!(n, 14);
    f.w(2)
        .run(|| std::fs::write(p("index.html"), b"HELLO FROM N3\n"))
        .unwrap();
    let g = f2.clone();
    buf = f
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
    for i in 0..3 {
        f.unmount(i).unwrap();
    }
    let (clean, text) = f.fsck().unwrap();
    assert!(clean, "fsck: {text}");
    let _ = (Duration::ZERO, std::io::sink().flush());
}
