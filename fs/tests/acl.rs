//! POSIX ACLs on a real mount with `-o acl`: the kernel enforces them (FUSE_POSIX_ACL),
//! the filesystem keeps mode and ACL in step and inherits default ACLs. Driven with the
//! real `setfacl` / `getfacl` (Debian's `acl`, installed by scripts/install-deps.sh).

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fsck, Mount};

/// Runs one of Debian's `acl` tools (scripts/install-deps.sh installs them) on `path`.
fn acl_tool(tool: &str, args: &[&str], path: &Path) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (scripts/install-deps.sh installs acl): {e}"))
}

fn setfacl(args: &[&str], path: &Path) {
    let out = acl_tool("setfacl", args, path);
    assert!(
        out.status.success(),
        "setfacl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// getfacl's entries without the comment header, one per line.
fn getfacl(args: &[&str], path: &Path) -> Vec<String> {
    let args: Vec<&str> = ["--omit-header", "--numeric"]
        .iter()
        .chain(args)
        .copied()
        .collect();
    let out = acl_tool("getfacl", &args, path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

/// Runs `f` on a thread whose filesystem ids are `uid`/`gid` (setfsuid is per thread).
fn as_ids<T: Send + 'static>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: changes only this thread's filesystem ids.
        unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
        }
        f()
    })
    .join()
    .unwrap()
}

/// 0 for success, else the errno.
fn code<T>(r: std::io::Result<T>) -> i32 {
    r.map_or_else(|e| e.raw_os_error().unwrap_or(-1), |_| 0)
}

/// Opening `p` for reading as `uid`/`gid`: 0 or the errno.
fn can_read(p: &Path, uid: u32, gid: u32) -> i32 {
    let p = p.to_path_buf();
    as_ids(uid, gid, move || code(fs::read(&p)))
}

/// Opening `p` for writing as `uid`/`gid`: 0 or the errno.
fn can_write(p: &Path, uid: u32, gid: u32) -> i32 {
    let p = p.to_path_buf();
    as_ids(uid, gid, move || {
        code(OpenOptions::new().write(true).open(&p))
    })
}

/// A shell command run with `umask`, in `dir` (so created paths are relative).
fn sh_with_umask(dir: &Path, umask: &str, script: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask}; {script}"))
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "{script}");
}

#[test]
fn access_acls_are_enforced_and_stay_in_step_with_the_mode() {
    let m = Mount::new("32M", "acl,allow_other");
    let f = m.path("f");
    fs::write(&f, b"data").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        can_read(&f, 1000, 1000),
        libc::EACCES,
        "0600 before any ACL"
    );

    // A named user: readable by 1000 only; the mode's group bits become the mask.
    setfacl(&["-m", "u:1000:r"], &f);
    assert_eq!(mode(&f), 0o640);
    assert_eq!(
        getfacl(&[], &f),
        [
            "user::rw-",
            "user:1000:r--",
            "group::---",
            "mask::r--",
            "other::---"
        ]
    );
    assert_eq!(can_read(&f, 1000, 1000), 0, "the ACL grants read");
    assert_eq!(can_write(&f, 1000, 1000), libc::EACCES, "but not write");
    assert_eq!(can_read(&f, 1001, 1001), libc::EACCES, "others get nothing");
    let ls = Command::new("ls").arg("-l").arg(&f).output().unwrap();
    assert_eq!(ls.stdout.get(10), Some(&b'+'), "ls -l marks ACLs");

    // chmod sets the mask, which limits the named user.
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(getfacl(&[], &f).contains(&"mask::---".to_string()));
    assert_eq!(can_read(&f, 1000, 1000), libc::EACCES, "mask --- wins");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o660)).unwrap();
    assert_eq!(can_write(&f, 1000, 1000), libc::EACCES, "u:1000 has r only");
    assert_eq!(can_read(&f, 1000, 1000), 0);

    // A named group, through the caller's fsgid.
    setfacl(&["-m", "g:2000:rw"], &f);
    assert_eq!(can_write(&f, 1002, 2000), 0, "g:2000 may write");
    assert_eq!(can_write(&f, 1002, 2001), libc::EACCES);

    // An ACL equivalent to a mode is not stored: it only sets the mode.
    setfacl(&["--set", "u::rw,g::r,o::r"], &f);
    assert_eq!(mode(&f), 0o644);
    assert_eq!(getfacl(&[], &f), ["user::rw-", "group::r--", "other::r--"]);
    let ls = Command::new("ls").arg("-l").arg(&f).output().unwrap();
    assert_eq!(ls.stdout.get(10), Some(&b' '), "no ACL stored any more");
    assert_eq!(can_write(&f, 1000, 1000), libc::EACCES);

    // setfacl -b removes the extended entries; a default ACL is for directories only.
    setfacl(&["-m", "u:1000:rw"], &f);
    assert_eq!(can_write(&f, 1000, 1000), 0);
    setfacl(&["-b"], &f);
    assert_eq!(can_write(&f, 1000, 1000), libc::EACCES);
    let out = acl_tool("setfacl", &["-d", "-m", "u:1000:r"], &f);
    assert!(!out.status.success(), "a default ACL on a file is refused");

    // Setting an ACL as a non-member of the file's group drops setgid.
    let g = m.path("g");
    fs::write(&g, b"").unwrap();
    std::os::unix::fs::chown(&g, Some(1000), Some(3000)).unwrap();
    fs::set_permissions(&g, fs::Permissions::from_mode(0o2775)).unwrap();
    let gp = g.clone();
    // u::rwx,u:5:r--,g::r-x,m::r-x,o::r-x, set by the owner from a thread with its ids.
    let acl = [
        (1, 7, u32::MAX),
        (2, 4, 5),
        (4, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 5, u32::MAX),
    ];
    let r = as_ids(1000, 1000, move || xattr_set_acl(&gp, &acl));
    assert_eq!(r, 0);
    assert_eq!(mode(&g) & 0o2000, 0, "setgid dropped for a non-member");
    fs::set_permissions(&g, fs::Permissions::from_mode(0o2775)).unwrap();
    setfacl(&["-m", "u:6:r"], &g);
    assert_eq!(mode(&g) & 0o2000, 0o2000, "root keeps setgid");

    // Everything survives a remount, and fsck is clean.
    let before = getfacl(&[], &g);
    let mut m = m;
    m.unmount();
    m.mount("acl,allow_other");
    assert_eq!(getfacl(&[], &m.path("g")), before);
    m.unmount();
    let (code, out) = fsck(&m.image, "-n");
    assert_eq!(code, 0, "{out}");
}

/// setxattr(system.posix_acl_access) of raw (tag, perm, id) entries; 0 or the errno.
fn xattr_set_acl(p: &Path, entries: &[(u16, u16, u32)]) -> i32 {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(t, perm, id) in entries {
        v.extend_from_slice(&t.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let n = c"system.posix_acl_access";
    // SAFETY: valid NUL-terminated strings and a buffer of v.len() bytes.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

#[test]
fn default_acls_are_inherited_and_replace_the_umask() {
    let m = Mount::new("32M", "acl,allow_other");
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    setfacl(
        &["-d", "--set", "u::rwx,u:1000:rwx,g::r-x,m::rwx,o::---"],
        &d,
    );
    let default = getfacl(&["-d"], &d);

    // umask 077 would leave group and others nothing; the default ACL decides instead.
    sh_with_umask(
        &d,
        "077",
        "echo x > f && mkdir sub && mkdir -m 0750 narrow && ln -s f l",
    );
    let f = d.join("f");
    assert_eq!(
        mode(&f),
        0o660,
        "0666 masked by the default ACL, not the umask"
    );
    assert_eq!(
        getfacl(&[], &f),
        [
            "user::rw-",
            "user:1000:rwx #effective:rw-",
            "group::r-x #effective:r--",
            "mask::rw-",
            "other::---"
        ]
    );
    assert_eq!(
        can_write(&f, 1000, 1000),
        0,
        "the inherited entry grants write"
    );
    assert_eq!(can_read(&f, 1001, 1001), libc::EACCES);

    let sub = d.join("sub");
    assert_eq!(mode(&sub), 0o770);
    assert_eq!(
        getfacl(&["-d"], &sub),
        default,
        "a new directory keeps the default"
    );
    let narrow = d.join("narrow");
    assert_eq!(
        mode(&narrow),
        0o750,
        "the requested mode masks the inherited ACL"
    );
    assert!(getfacl(&[], &narrow).contains(&"mask::r-x".to_string()));
    // Inheritance goes down the tree.
    sh_with_umask(&sub, "077", "echo y > deeper");
    assert_eq!(can_write(&sub.join("deeper"), 1000, 1000), 0);
    assert!(fs::symlink_metadata(d.join("l"))
        .unwrap()
        .file_type()
        .is_symlink());

    // Outside the directory the umask applies as usual.
    sh_with_umask(&m.dir, "077", "echo z > plain && mkdir plaindir");
    assert_eq!(mode(&m.path("plain")), 0o600);
    assert_eq!(mode(&m.path("plaindir")), 0o700);
    assert_eq!(
        getfacl(&[], &m.path("plain")),
        ["user::rw-", "group::---", "other::---"]
    );

    // Removing the default ACL: new files take the umask again.
    setfacl(&["-k"], &d);
    sh_with_umask(&d, "077", "echo w > after");
    assert_eq!(mode(&d.join("after")), 0o600);
    let mut m = m;
    m.unmount();
    let (code, out) = fsck(&m.image, "-n");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn without_the_acl_option_stored_acls_are_kept_but_not_served() {
    let mut m = Mount::new("32M", "acl,allow_other");
    let f: PathBuf = m.path("f");
    fs::write(&f, b"").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    setfacl(&["-m", "u:1000:r"], &f);
    assert_eq!(can_read(&f, 1000, 1000), 0);
    m.unmount();
    m.mount("allow_other");
    let c = std::ffi::CString::new(f.to_str().unwrap()).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(r, -1);
    // The kernel may answer from its own cache ("no ACL") without asking us.
    let e = std::io::Error::last_os_error().raw_os_error();
    assert!(
        e == Some(libc::EOPNOTSUPP) || e == Some(libc::ENODATA),
        "{e:?}"
    );
    assert_eq!(
        can_read(&f, 1000, 1000),
        libc::EACCES,
        "not enforced either"
    );
    m.unmount();
    m.mount("acl,allow_other");
    assert!(getfacl(&[], &f).contains(&"user:1000:r--".to_string()));
    assert_eq!(can_read(&f, 1000, 1000), 0, "enforced again");
}
