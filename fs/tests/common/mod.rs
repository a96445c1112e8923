//! Test fixtures: make an image, run `mount.tandem -f` as a real child process, and always
//! unmount and reap it — on success, failure or panic (Drop).

#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tandemfs");

/// Runs one of the tools (`mkfs`, `mount`, `fsck`) and returns its status and output.
pub fn tool(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run tandemfs");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn mkfs(image: &Path, size: &str, extra: &[&str]) {
    let img = image.to_str().unwrap();
    let mut args = vec![
        "mkfs",
        "-q",
        "-t",
        "test:fs",
        "-p",
        "lock_nolock",
        "-s",
        size,
    ];
    args.extend_from_slice(extra);
    args.push(img);
    let (st, _, err) = tool(&args);
    assert!(st.success(), "mkfs failed: {err}");
}

pub fn fsck(image: &Path, flag: &str) -> (i32, String) {
    let (st, out, err) = tool(&["fsck", flag, image.to_str().unwrap()]);
    (st.code().unwrap_or(-1), format!("{out}{err}"))
}

pub fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

fn umount(dir: &Path, flags: i32) -> bool {
    let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; umount2 has no other memory effects.
    unsafe { libc::umount2(c.as_ptr(), flags) == 0 }
}

/// A mounted filesystem served by a child `mount.tandem -f` process.
pub struct Mount {
    pub tmp: tempfile::TempDir,
    pub image: PathBuf,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Fresh `lock_nolock` filesystem of `size` mounted with `opts`.
    pub fn new(size: &str, opts: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("img");
        mkfs(&image, size, &["-J", "4"]);
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let mut m = Mount {
            tmp,
            image,
            dir,
            child: None,
        };
        m.mount(opts);
        m
    }

    /// Mounts an existing TARGET (image path or NBD URI) at `dir`; `tmp` holds the log.
    pub fn adopt(tmp_parent: &Path, target: &str, dir: &Path) -> Self {
        let tmp = tempfile::tempdir_in(tmp_parent).unwrap();
        let mut m = Mount {
            tmp,
            image: PathBuf::from(target),
            dir: dir.to_path_buf(),
            child: None,
        };
        m.mount("");
        m
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Starts the daemon and waits until the kernel shows the mount.
    pub fn mount(&mut self, opts: &str) {
        assert!(self.child.is_none());
        let mut cmd = Command::new(BIN);
        cmd.args([
            "mount",
            self.image.to_str().unwrap(),
            self.dir.to_str().unwrap(),
            "-f",
        ]);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        let log = std::fs::File::create(self.tmp.path().join("mount.log")).unwrap();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !is_mounted(&self.dir) {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("mount.tandem exited with {st}: {}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "mount did not appear"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    /// The mount daemon's pid (while mounted).
    pub fn daemon_pid(&self) -> u32 {
        self.child.as_ref().expect("mounted").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("mount.log")).unwrap_or_default()
    }

    /// Clean unmount: umount(2), then the daemon checkpoints and exits 0.
    pub fn unmount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let start = Instant::now();
        while !umount(&self.dir, 0) {
            if start.elapsed() > Duration::from_secs(10) {
                umount(&self.dir, libc::MNT_DETACH);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = wait_timeout(&mut child, Duration::from_secs(20));
        assert!(
            st.is_some_and(|s| s.success()),
            "daemon did not exit cleanly: {st:?}: {}",
            self.log()
        );
    }

    /// Simulated crash of the daemon: SIGKILL, then detach the dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        umount(&self.dir, libc::MNT_DETACH);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

fn wait_timeout(child: &mut Child, t: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() > t {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if !umount(&self.dir, 0) {
                umount(&self.dir, libc::MNT_DETACH);
            }
            if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
                umount(&self.dir, libc::MNT_DETACH);
            }
        }
    }
}

/// errno of an io::Error, for readable asserts.
pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}
