//! The kernel's readahead window for our mount. A FUSE mount gets the kernel's default
//! (128 KiB) and INIT cannot raise it, so cold sequential reads arrive as 128 KiB requests;
//! the window is the mount's backing-device setting in sysfs, which root may raise. With
//! 1 MiB (our largest request) a cold 512 MiB read went from about 800 MB/s to 1.1-1.2 GB/s.

use std::path::{Path, PathBuf};

/// Raises the readahead window of the FUSE mount at `dir` to `kib` KiB. Best effort: a
/// failure only costs speed, so it is logged, not returned.
pub(crate) fn raise(dir: &str, kib: u32) {
    let abs = Path::new(dir);
    // /proc/self/mountinfo, not stat(2): the session is not serving yet, and a stat of
    // the mount point would wait for ourselves.
    let dev = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| fuse_device_of(&info, abs));
    let Some(dev) = dev else {
        tracing::warn!(dir = %abs.display(), "cannot find our mount in /proc/self/mountinfo; keeping the kernel's readahead");
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, kib.to_string()) {
        Ok(()) => tracing::debug!(%knob, kib, "readahead window raised"),
        Err(e) => tracing::warn!(%knob, error = %e, "cannot raise the readahead window"),
    }
}

/// `dir` made absolute against the working directory, lexically.
pub(crate) fn absolute(dir: &str) -> PathBuf {
    let p = Path::new(dir);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    // Lexically, without touching the filesystem (the mount point is ours).
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The `major:minor` of the last FUSE mount at `dir` in a mountinfo text.
fn fuse_device_of(mountinfo: &str, dir: &Path) -> Option<String> {
    mountinfo.lines().rev().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let f: Vec<&str> = mount.split(' ').collect();
        let fstype = fs.split(' ').next()?;
        let is_fuse = fstype == "fuse" || fstype.starts_with("fuse.");
        (is_fuse && f.len() > 4 && Path::new(&unescape(f[4])) == dir).then(|| f[2].to_string())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 4 <= b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_fuse_mount_at_a_directory() {
        let info = "\
22 1 252:0 / / rw,relatime - ext4 /dev/vda rw
43 27 0:39 / /var/tmp/my\\040mnt rw,nosuid,nodev,relatime - fuse t.img rw,user_id=0
44 27 0:40 / /var/tmp/other rw - fuse.sshfs x rw
45 43 0:41 / /var/tmp/my\\040mnt rw,nosuid,nodev,relatime - fuse t2.img rw,user_id=0
";
        assert_eq!(
            fuse_device_of(info, Path::new("/var/tmp/my mnt")).as_deref(),
            Some("0:41")
        );
        assert_eq!(
            fuse_device_of(info, Path::new("/var/tmp/other")).as_deref(),
            Some("0:40")
        );
        assert_eq!(fuse_device_of(info, Path::new("/")), None);
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
    }

    #[test]
    fn absolute_paths_are_lexical() {
        assert_eq!(absolute("/a/./b/../c"), PathBuf::from("/a/c"));
    }
}
