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

#[test]
fn filesystem_works_on_an_nbd_export() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("nbd.sock");
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(["memory", "64M"])
        .stdout(Stdio::null())
        .spawn()
        .expect("nbdkit is needed for this test (apt-get install nbdkit)");
    let _server = Nbdkit(child);
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nbdkit did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
