//! The filesystem on an NBD export: mkfs, mount, write, remount and fsck through
//! `nbd+unix://` URIs, served by nbdkit's memory plugin (apt package `nbdkit`).

#![cfg(feature = "nbd")]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_mounted, tool};

struct Nbdkit(Child);
impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nbdkit's memory plugin of `size` on a Unix socket in `dir`.
fn nbdkit(dir: &std::path::Path, size: &str) -> (Nbdkit, std::path::PathBuf) {
    let sock = dir.join("nbd.sock");
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(["memory", size])
        .stdout(Stdio::null())
        .spawn()
        .expect("nbdkit is needed for this test (apt-get install nbdkit)");
    let server = Nbdkit(child);
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nbdkit did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, sock)
}

#[test]
fn read_many_keeps_requests_in_flight_matches_replies_and_survives_an_error() {
    use tandem_replicator::nbd::client::NbdClient;
    let tmp = tempfile::tempdir().unwrap();
    let (_server, sock) = nbdkit(tmp.path(), "16M");
    let mut c = NbdClient::connect_unix(&sock, "").unwrap();
    let block = |i: u64| vec![(i % 251) as u8 + 1; 4096];
    for i in 0..200u64 {
        c.write_at(&block(i), i * 7 * 4096, false).unwrap();
    }
    // 200 scattered reads (more than the window), some merged into larger ranges.
    let mut bufs: Vec<(u64, Vec<u8>)> = (0..200u64)
        .rev()
        .map(|i| (i * 7 * 4096, vec![0u8; 4096]))
        .collect();
    bufs.push((0, vec![0u8; 8 * 4096]));
    let mut reqs: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .map(|(o, b)| (*o, b.as_mut_slice()))
        .collect();
    c.read_many(&mut reqs).unwrap();
    for (k, (off, buf)) in bufs.iter().enumerate().take(200) {
        assert_eq!(*buf, block(off / (7 * 4096)), "range {k} at {off}");
    }
    assert_eq!(bufs[200].1[..4096], block(0)[..]);
    // A request past the end fails, the others still arrive, the connection stays usable.
    let mut a = vec![0u8; 4096];
    let mut past = vec![0u8; 4096];
    let mut reqs: Vec<(u64, &mut [u8])> = vec![(7 * 4096, &mut a), (16 << 20, &mut past)];
    assert!(c.read_many(&mut reqs).is_err());
    let mut again = vec![0u8; 4096];
    c.read_at(&mut again, 14 * 4096).unwrap();
    assert_eq!(again, block(2));
}

#[test]
fn write_many_keeps_requests_in_flight_splits_big_ranges_and_survives_an_error() {
    use tandem_replicator::nbd::client::NbdClient;
    let tmp = tempfile::tempdir().unwrap();
    let (_server, sock) = nbdkit(tmp.path(), "80M");
    let mut c = NbdClient::connect_unix(&sock, "").unwrap();
    let block = |i: u64| vec![(i % 251) as u8 + 1; 4096];
    // 100 scattered blocks (more than the window) and one range beyond the largest
    // request, which goes out in pieces.
    let bufs: Vec<(u64, Vec<u8>)> = (0..100u64).map(|i| (i * 5 * 4096, block(i))).collect();
    let big: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % 241) as u8).collect();
    let mut reqs: Vec<(u64, &[u8])> = bufs.iter().map(|(o, b)| (*o, b.as_slice())).collect();
    reqs.push((16 << 20, &big));
    c.write_many(&reqs).unwrap();
    for (off, want) in &bufs {
        let mut got = vec![0u8; 4096];
        c.read_at(&mut got, *off).unwrap();
        assert_eq!(&got, want, "block at {off}");
    }
    let mut got = vec![0u8; big.len()];
    c.read_at(&mut got, 16 << 20).unwrap();
    assert!(got == big, "the big range reads back");
    // A write past the end fails, the other lands, the connection stays usable.
    let reqs: Vec<(u64, &[u8])> = vec![(80 << 20, &bufs[0].1), (3 * 4096, &bufs[1].1)];
    assert!(c.write_many(&reqs).is_err());
    let mut again = vec![0u8; 4096];
    c.read_at(&mut again, 3 * 4096).unwrap();
    assert_eq!(again, block(1));
}

#[test]
fn filesystem_works_on_an_nbd_export() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, sock) = nbdkit(tmp.path(), "64M");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let (st, out, err) = tool(&["mkfs", "-t", "c:nbd", "-p", "lock_nolock", &uri]);
    assert!(st.success(), "{err}");
    assert!(out.contains("lock_nolock"));
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    for round in 0..2 {
        let mut m = common::Mount::adopt(tmp.path(), &uri, &dir);
        if round == 0 {
            std::fs::create_dir(dir.join("html")).unwrap();
            std::fs::write(dir.join("html/index.html"), b"<h1>tandem</h1>").unwrap();
            std::fs::write(dir.join("big"), &data).unwrap();
        } else {
            assert_eq!(
                std::fs::read(dir.join("html/index.html")).unwrap(),
                b"<h1>tandem</h1>"
            );
            assert_eq!(std::fs::read(dir.join("big")).unwrap(), data);
        }
        m.unmount();
        assert!(!is_mounted(&dir));
    }
    let (st, out, err) = tool(&["fsck", "-n", &uri]);
    assert!(st.success(), "{out}{err}");
    assert!(out.contains("clean"), "{out}");
}
