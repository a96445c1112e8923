//! The command-line tools as users run them: names via argv[0], help, exit codes and
//! messages for bad input, daemonizing, and clean unmount on SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fsck, is_mounted, mkfs, tool, BIN};

/// Links the multi-call binary under its real tool names, as an install would.
fn linked(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if !p.exists() {
        std::os::unix::fs::symlink(BIN, &p).unwrap();
    }
    p
}

/// Unmounts (lazily) whatever is left at `dir` when a test ends, even on panic.
struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn daemon_pid(image: &Path) -> Option<i32> {
    let want = image.to_str().unwrap();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_mount = |a: &&[u8]| *a == b"mount" || a.ends_with(b"mount.tandem");
        if args.iter().any(is_mount) && args.contains(&want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tools_answer_to_their_names_with_help() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, needle) in [
        ("mkfs.tandem", "CLUSTER:FSNAME"),
        ("fsck.tandem", "-y"),
        ("mount.tandem", "allow_other"),
    ] {
        let out = Command::new(linked(tmp.path(), name))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} --help failed");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(needle),
            "{name} --help lacks {needle}"
        );
    }
    let out = Command::new(linked(tmp.path(), "mkfs.tandem"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "mkfs without arguments must fail");
}

#[test]
fn mkfs_rejects_bad_arguments_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let img = img.to_str().unwrap();
    let (st, _, err) = tool(&["mkfs", "-t", "nocolon", "-s", "16M", img]);
    assert!(!st.success() && err.contains("CLUSTER:FSNAME"), "{err}");
    let (st, _, err) = tool(&["mkfs", "-t", "c:f", "-p", "lock_dlm", "-s", "16M", img]);
    assert!(!st.success() && err.contains("lock_dlm"), "{err}");
    let (st, _, err) = tool(&["mkfs", "-t", "c:f", "-b", "3000", "-s", "16M", img]);
    assert!(!st.success() && err.contains("block size"), "{err}");
    let (st, _, err) = tool(&["mkfs", "-t", "c:f", "nbd+unix:///x?socket=/nonexistent"]);
    let want = if cfg!(feature = "nbd") {
        "cannot connect to NBD export"
    } else {
        "no NBD support"
    };
    assert!(!st.success() && err.contains(want), "{err}");
    let (st, _, err) = tool(&["mkfs", "-t", "c:f", "-s", "1G", "nbd+unix:///x?socket=/s"]);
    assert!(!st.success() && err.contains("image files"), "{err}");
    let (st, out, _) = tool(&[
        "mkfs", "-t", "c:f", "-j", "3", "-b", "1024", "-s", "16M", img,
    ]);
    assert!(st.success());
    assert!(
        out.contains("Journals:          3") && out.contains("lock_tandem"),
        "{out}"
    );
    assert_eq!(fsck(Path::new(img), "-n").0, 0);
}

#[test]
fn mount_refuses_bad_images_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let _guard = Unmount(dir.clone());
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 1 << 20]).unwrap();
    let (st, _, err) = tool(&["mount", junk.to_str().unwrap(), dir.to_str().unwrap(), "-f"]);
    assert_eq!(st.code(), Some(32));
    assert!(err.contains("not a tandem filesystem"), "{err}");
    let (st, _, err) = tool(&["mount", "/nonexistent/img", dir.to_str().unwrap()]);
    assert_eq!(st.code(), Some(32));
    assert!(err.contains("cannot open"), "{err}");
    // A cluster filesystem needs tandem-lockd; lockproto=lock_nolock overrides (GFS2-style).
    let cluster = tmp.path().join("cluster");
    let (st, _, e) = tool(&[
        "mkfs",
        "-q",
        "-t",
        "c:f",
        "-s",
        "32M",
        cluster.to_str().unwrap(),
    ]);
    assert!(st.success(), "{e}");
    let (st, _, err) = tool(&[
        "mount",
        cluster.to_str().unwrap(),
        dir.to_str().unwrap(),
        "-f",
    ]);
    assert_eq!(st.code(), Some(32));
    assert!(err.contains("tandem-lockd"), "{err}");
    let (st, _, err) = tool(&[
        "mount",
        cluster.to_str().unwrap(),
        dir.to_str().unwrap(),
        "-o",
        "lockproto=lock_nolock",
    ]);
    assert!(st.success(), "{err}");
    assert!(is_mounted(&dir));
    assert!(Command::new("umount").arg(&dir).status().unwrap().success());
    wait_for("daemon exit", || daemon_pid(&cluster).is_none());
    let (st, _, err) = tool(&[
        "mount",
        cluster.to_str().unwrap(),
        dir.to_str().unwrap(),
        "-o",
        "bogus_option",
    ]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("bogus_option"), "{err}");
}

#[test]
fn daemon_unmounts_cleanly_on_sigterm_and_umount() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    mkfs(&img, "32M", &[]);
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let _guard = Unmount(dir.clone());
    let mount = linked(tmp.path(), "mount.tandem");
    for how in ["sigterm", "umount"] {
        let st = Command::new(&mount).arg(&img).arg(&dir).status().unwrap();
        assert!(st.success(), "daemonizing mount failed");
        assert!(
            is_mounted(&dir),
            "mount must exist when mount.tandem returns"
        );
        std::fs::write(dir.join(how), how.repeat(1000)).unwrap();
        let pid = daemon_pid(&img).expect("daemon process");
        match how {
            // SAFETY: sending a signal to the daemon we started.
            "sigterm" => assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0),
            _ => assert!(Command::new("umount").arg(&dir).status().unwrap().success()),
        }
        wait_for("unmount", || !is_mounted(&dir));
        wait_for("daemon exit", || daemon_pid(&img).is_none());
        let (code, out) = fsck(&img, "-n");
        assert_eq!(code, 0, "{out}");
        assert!(
            !out.contains("not unmounted cleanly"),
            "clean flag must be set: {out}"
        );
    }
    let st = Command::new(&mount).arg(&img).arg(&dir).status().unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(dir.join("sigterm")).unwrap(),
        "sigterm".repeat(1000)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("umount")).unwrap(),
        "umount".repeat(1000)
    );
    assert!(Command::new("umount").arg(&dir).status().unwrap().success());
    wait_for("daemon exit", || daemon_pid(&img).is_none());
}

#[test]
fn a_mounted_filesystem_cannot_be_mounted_again_or_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    mkfs(&img, "32M", &[]);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let _guard_a = Unmount(a.clone());
    let _guard_b = Unmount(b.clone());
    let (st, _, err) = tool(&["mount", img.to_str().unwrap(), a.to_str().unwrap()]);
    assert!(st.success(), "{err}");
    let (st, _, err) = tool(&["mount", img.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(st.code(), Some(32));
    assert!(err.contains("in use"), "{err}");
    assert!(!is_mounted(&b));
    let (code, out) = fsck(&img, "-y");
    assert_eq!(code, 8);
    assert!(out.contains("in use"), "{out}");
    let (st, _, err) = tool(&["mkfs", "-t", "c:f", img.to_str().unwrap()]);
    assert!(!st.success() && err.contains("in use"), "{err}");
    assert!(Command::new("umount").arg(&a).status().unwrap().success());
    wait_for("daemon exit", || daemon_pid(&img).is_none());
    assert_eq!(fsck(&img, "-n").0, 0);
}
