//! POSIX behaviour suite, run against a real FUSE mount of `mount.tandem`.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{errno, fsck, Mount};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths; the syscall only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn files_and_directories_persist_across_remount() {
    let mut m = Mount::new("64M", "");
    fs::write(m.path("small"), b"hello").unwrap();
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    fs::write(m.path("a/b/c/big"), &big).unwrap();
    m.unmount();
    assert_eq!(fsck(&m.image, "-n").0, 0);
    m.mount("");
    assert_eq!(fs::read(m.path("small")).unwrap(), b"hello");
    assert_eq!(fs::read(m.path("a/b/c/big")).unwrap(), big);
    assert!(m.path("a/b").is_dir());
}

#[test]
fn error_codes_match_posix() {
    let m = Mount::new("32M", "");
    fs::write(m.path("f"), b"x").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/inner"), b"y").unwrap();
    assert_eq!(errno(fs::read(m.path("missing"))), libc::ENOENT);
    assert_eq!(errno(fs::write(m.path("nodir/x"), b"")), libc::ENOENT);
    assert_eq!(errno(fs::create_dir(m.path("f"))), libc::EEXIST);
    assert_eq!(
        errno(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.path("f"))
        ),
        libc::EEXIST
    );
    assert_eq!(errno(fs::remove_dir(m.path("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_dir(m.path("f"))), libc::ENOTDIR);
    assert_eq!(errno(fs::remove_file(m.path("d"))), libc::EISDIR);
    assert_eq!(
        errno(OpenOptions::new().write(true).open(m.path("d"))),
        libc::EISDIR
    );
    assert_eq!(errno(fs::write(m.path("f/sub"), b"")), libc::ENOTDIR);
    let long = "n".repeat(256);
    assert_eq!(errno(fs::write(m.path(&long), b"")), libc::ENAMETOOLONG);
    assert_eq!(errno(fs::metadata(m.path(&long))), libc::ENAMETOOLONG);
    let max = "m".repeat(255);
    fs::write(m.path(&max), b"ok").unwrap();
    assert_eq!(fs::read(m.path(&max)).unwrap(), b"ok");
    assert_eq!(
        errno(fs::hard_link(m.path("d"), m.path("dlink"))),
        libc::EPERM
    );
    assert_eq!(errno(fs::read_link(m.path("f"))), libc::EINVAL);
}

#[test]
fn rename_replaces_refuses_and_exchanges() {
    let m = Mount::new("32M", "");
    fs::write(m.path("a"), b"A").unwrap();
    fs::write(m.path("b"), b"B").unwrap();
    fs::create_dir_all(m.path("d1/sub")).unwrap();
    fs::create_dir(m.path("d2")).unwrap();
    fs::create_dir(m.path("empty")).unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    assert_eq!(errno(fs::metadata(m.path("a"))), libc::ENOENT);
    fs::write(m.path("c"), b"C").unwrap();
    assert_eq!(
        errno(renameat2(
            &m.path("c"),
            &m.path("b"),
            libc::RENAME_NOREPLACE
        )),
        libc::EEXIST
    );
    renameat2(&m.path("c"), &m.path("b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"C");
    assert_eq!(fs::read(m.path("c")).unwrap(), b"A");
    assert_eq!(
        errno(renameat2(
            &m.path("zz"),
            &m.path("b"),
            libc::RENAME_EXCHANGE
        )),
        libc::ENOENT
    );
    // Exchange a file and a directory across parents.
    renameat2(&m.path("c"), &m.path("d1/sub"), libc::RENAME_EXCHANGE).unwrap();
    assert!(m.path("c").is_dir());
    assert_eq!(fs::read(m.path("d1/sub")).unwrap(), b"A");
    assert_eq!(fs::metadata(m.path("d1")).unwrap().nlink(), 2);
    assert_eq!(
        errno(fs::rename(m.path("d1"), m.path("d1/inside"))),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs::rename(m.path("b"), m.path("empty"))),
        libc::EISDIR
    );
    assert_eq!(
        errno(fs::rename(m.path("empty"), m.path("b"))),
        libc::ENOTDIR
    );
    fs::write(m.path("d2/x"), b"").unwrap();
    assert_eq!(
        errno(fs::rename(m.path("empty"), m.path("d2"))),
        libc::ENOTEMPTY
    );
    fs::rename(m.path("d2"), m.path("empty")).unwrap();
    assert!(m.path("empty/x").exists());
    fs::rename(m.path("empty"), m.path("c/moved")).unwrap();
    assert!(m.path("c/moved/x").exists());
    assert_eq!(fs::metadata(m.path("c")).unwrap().nlink(), 3);
    // Renaming a file onto its own hard link is a no-op.
    fs::hard_link(m.path("b"), m.path("b2")).unwrap();
    fs::rename(m.path("b"), m.path("b2")).unwrap();
    assert!(m.path("b").exists() && m.path("b2").exists());
    let root = fs::metadata(&m.dir).unwrap();
    assert_eq!(root.nlink(), 2 + 2, "root holds d1 and c");
}

#[test]
fn hard_links_symlinks_and_unlinked_open_files() {
    let mut m = Mount::new("32M", "");
    fs::write(m.path("f"), b"data").unwrap();
    fs::hard_link(m.path("f"), m.path("g")).unwrap();
    assert_eq!(fs::metadata(m.path("f")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.path("f")).unwrap().ino(),
        fs::metadata(m.path("g")).unwrap().ino()
    );
    fs::remove_file(m.path("f")).unwrap();
    assert_eq!(fs::read(m.path("g")).unwrap(), b"data");
    assert_eq!(fs::metadata(m.path("g")).unwrap().nlink(), 1);
    std::os::unix::fs::symlink("g", m.path("s")).unwrap();
    let long_target = "x/".repeat(1500);
    std::os::unix::fs::symlink(&long_target, m.path("long")).unwrap();
    assert_eq!(fs::read_link(m.path("s")).unwrap().as_os_str(), "g");
    assert_eq!(
        fs::read_link(m.path("long")).unwrap().as_os_str().len(),
        3000
    );
    assert_eq!(fs::read(m.path("s")).unwrap(), b"data");
    assert!(fs::symlink_metadata(m.path("s"))
        .unwrap()
        .file_type()
        .is_symlink());
    // An unlinked file stays readable and writable through an open descriptor.
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .open(m.path("g"))
        .unwrap();
    fs::remove_file(m.path("g")).unwrap();
    assert_eq!(errno(fs::metadata(m.path("g"))), libc::ENOENT);
    f.write_all(b"-more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "data-more");
    drop(f);
    m.unmount();
    let (code, out) = fsck(&m.image, "-n");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn permissions_are_enforced_for_other_users() {
    let m = Mount::new("32M", "allow_other");
    fs::write(m.path("public"), b"pub").unwrap();
    fs::write(m.path("secret"), b"sec").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.path("locked")).unwrap();
    fs::set_permissions(m.path("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(m.path("open")).unwrap();
    fs::set_permissions(m.path("open"), fs::Permissions::from_mode(0o777)).unwrap();
    let dir = m.dir.clone();
    // setfsuid is per thread, so only this thread acts as uid 1000.
    let res = std::thread::spawn(move || {
        // SAFETY: changes only this thread's filesystem ids.
        unsafe {
            libc::setfsgid(1000);
            libc::setfsuid(1000);
        }
        let read_public = fs::read(dir.join("public")).map(|v| v == b"pub");
        let read_secret = fs::read(dir.join("secret"));
        let create_locked = fs::write(dir.join("locked/new"), b"");
        let write_public = OpenOptions::new().write(true).open(dir.join("public"));
        let create_open = fs::write(dir.join("open/mine"), b"ok");
        let owner = fs::metadata(dir.join("open/mine")).map(|md| (md.uid(), md.gid()));
        (
            read_public.unwrap(),
            errno(read_secret),
            errno(create_locked),
            errno(write_public),
            create_open.is_ok(),
            owner.unwrap(),
        )
    })
    .join()
    .unwrap();
    assert!(res.0, "other users can read a 0644 file");
    assert_eq!(res.1, libc::EACCES);
    assert_eq!(res.2, libc::EACCES);
    assert_eq!(res.3, libc::EACCES);
    assert!(res.4, "other users can create in a 0777 directory");
    assert_eq!(res.5, (1000, 1000), "new files belong to the caller");
}

#[test]
fn chmod_chown_utimens_and_setgid_directories() {
    let m = Mount::new("32M", "");
    fs::write(m.path("f"), b"x").unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(fs::metadata(m.path("f")).unwrap().mode() & 0o7777, 0o4751);
    std::os::unix::fs::chown(m.path("f"), Some(123), Some(456)).unwrap();
    let md = fs::metadata(m.path("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (123, 456));
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(m.path("f"))
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
    let md = fs::metadata(m.path("f")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!(md.atime(), 1_000_000_000);
    fs::create_dir(m.path("g")).unwrap();
    std::os::unix::fs::chown(m.path("g"), None, Some(77)).unwrap();
    fs::set_permissions(m.path("g"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::write(m.path("g/child"), b"").unwrap();
    fs::create_dir(m.path("g/sub")).unwrap();
    assert_eq!(fs::metadata(m.path("g/child")).unwrap().gid(), 77);
    assert_eq!(
        fs::metadata(m.path("g/sub")).unwrap().mode() & 0o2000,
        0o2000
    );
    let before = fs::metadata(&m.dir).unwrap().mtime_nsec();
    std::thread::sleep(std::time::Duration::from_millis(5));
    fs::write(m.path("new"), b"").unwrap();
    let after = fs::metadata(&m.dir).unwrap();
    assert!(
        after.mtime_nsec() != before || after.mtime() > 0,
        "creating a file updates the parent's mtime"
    );
}

#[test]
fn extended_attributes() {
    let m = Mount::new("32M", "");
    let p = m.path("f");
    fs::write(&p, b"").unwrap();
    let c = cpath(&p);
    let set = |name: &str, val: &[u8], flags: i32| {
        let n = CString::new(name).unwrap();
        // SAFETY: valid pointers and lengths.
        let r = unsafe {
            libc::setxattr(
                c.as_ptr(),
                n.as_ptr(),
                val.as_ptr().cast(),
                val.len(),
                flags,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let get = |name: &str, cap: usize| {
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; cap];
        // SAFETY: buf has `cap` bytes.
        let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), cap) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            buf.truncate(r as usize);
            Ok(buf)
        }
    };
    set("user.color", b"blue", 0).unwrap();
    set("trusted.t", b"1", 0).unwrap();
    set("security.s", b"2", 0).unwrap();
    assert_eq!(get("user.color", 100).unwrap(), b"blue");
    assert_eq!(errno(get("user.color", 2)), libc::ERANGE);
    assert_eq!(errno(get("user.none", 100)), libc::ENODATA);
    assert_eq!(
        errno(set("user.color", b"red", libc::XATTR_CREATE)),
        libc::EEXIST
    );
    assert_eq!(
        errno(set("user.other", b"x", libc::XATTR_REPLACE)),
        libc::ENODATA
    );
    set("user.color", b"red", libc::XATTR_REPLACE).unwrap();
    assert_eq!(get("user.color", 100).unwrap(), b"red");
    let mut list = vec![0u8; 256];
    // SAFETY: list has 256 bytes.
    let n = unsafe { libc::listxattr(c.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(n > 0);
    let names: Vec<&[u8]> = list[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(names, vec![&b"user.color"[..], b"trusted.t", b"security.s"]);
    let n = CString::new("user.color").unwrap();
    // SAFETY: valid NUL-terminated strings.
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }, 0);
    assert_eq!(errno(get("user.color", 100)), libc::ENODATA);
    assert_eq!(errno(set("user.big", &vec![1u8; 8000], 0)), libc::ENOSPC);
    // POSIX ACLs (which the kernel would not enforce without FUSE_POSIX_ACL) and SELinux
    // labels are "not supported", on reads too: that is what lets `ls -l` stop asking.
    // An extended ACL (version 2): user::rw- user:1000:r-- group::r-- mask::r-- other::r--.
    let acl: Vec<u8> = [2u32.to_le_bytes().to_vec()]
        .into_iter()
        .chain(
            [
                (0x01u16, 6u16, u32::MAX),
                (0x02, 4, 1000),
                (0x04, 4, u32::MAX),
                (0x10, 4, u32::MAX),
                (0x20, 4, u32::MAX),
            ]
            .into_iter()
            .map(|(tag, perm, id)| {
                [
                    tag.to_le_bytes().to_vec(),
                    perm.to_le_bytes().to_vec(),
                    id.to_le_bytes().to_vec(),
                ]
                .concat()
            }),
        )
        .collect::<Vec<_>>()
        .concat();
    for name in [
        "system.posix_acl_access",
        "system.posix_acl_default",
        "security.selinux",
    ] {
        // The kernel may answer an ACL read from its own cache ("none") without asking.
        let e = errno(get(name, 100));
        assert!(
            e == libc::EOPNOTSUPP || (e == libc::ENODATA && name.starts_with("system.")),
            "{name}: errno {e}"
        );
        // (A default ACL only exists on directories: the kernel refuses it on a file.)
        if name != "system.posix_acl_default" {
            assert_eq!(errno(set(name, &acl, 0)), libc::EOPNOTSUPP, "{name}");
        }
    }
    let dir = m.path("d");
    fs::create_dir(&dir).unwrap();
    let d = cpath(&dir);
    let n = CString::new("system.posix_acl_default").unwrap();
    // SAFETY: valid pointers and lengths.
    let r = unsafe { libc::setxattr(d.as_ptr(), n.as_ptr(), acl.as_ptr().cast(), acl.len(), 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    // So `ls -l` of a directory asks once per device, not twice per entry.
    for i in 0..50 {
        fs::write(dir.join(format!("e{i}")), b"").unwrap();
    }
    // Cold inodes, as after a mount: the kernel's cached "no ACL" would answer otherwise.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    let out = Command::new("strace")
        .args(["-f", "-c", "-e", "trace=getxattr,lgetxattr", "ls", "-l"])
        .arg(&dir)
        .output()
        .expect("strace (scripts/install-deps.sh installs it)");
    {
        let summary = String::from_utf8_lossy(&out.stderr);
        let calls: u64 = summary
            .lines()
            .filter(|l| l.contains("getxattr"))
            .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
            .sum();
        assert!(calls <= 4, "ls -l made {calls} getxattr calls:\n{summary}");
    }
}

#[test]
fn sparse_files_beyond_4gib_fallocate_and_punch() {
    let m = Mount::new("64M", "");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("sparse"))
        .unwrap();
    let off = 5u64 << 30;
    f.write_all_at(b"far away", off).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), off + 8);
    assert!(md.blocks() <= 16, "only the written block is allocated");
    let mut buf = [1u8; 4];
    f.read_exact_at(&mut buf, 1 << 30).unwrap();
    assert_eq!(buf, [0; 4]);
    f.read_exact_at(&mut buf, off).unwrap();
    assert_eq!(&buf, b"far ");
    f.set_len(100).unwrap();
    assert_eq!(f.metadata().unwrap().blocks(), 0);
    // fallocate reserves blocks that read as zeros; punching a hole frees them again.
    let g = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("falloc"))
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::fallocate(g.as_raw_fd(), 0, 0, 1 << 20) }, 0);
    assert_eq!(g.metadata().unwrap().len(), 1 << 20);
    assert_eq!(g.metadata().unwrap().blocks(), (1 << 20) / 512);
    let mut z = vec![9u8; 8192];
    g.read_exact_at(&mut z, 4096).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    g.write_all_at(&[7u8; 10000], 0).unwrap();
    // SAFETY: valid fd.
    let r = unsafe {
        libc::fallocate(
            g.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            100,
            8192,
        )
    };
    assert_eq!(r, 0);
    let mut back = vec![0u8; 10000];
    g.read_exact_at(&mut back, 0).unwrap();
    assert!(back[..100].iter().all(|&b| b == 7));
    assert!(back[100..8292].iter().all(|&b| b == 0));
    assert!(back[8292..].iter().all(|&b| b == 7));
    assert_eq!(
        g.metadata().unwrap().blocks(),
        ((1 << 20) - 4096) / 512,
        "one full block was freed"
    );
}

#[test]
fn full_filesystem_returns_enospc_without_corruption() {
    let mut m = Mount::new("24M", "");
    let chunk = vec![0xabu8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(m.path("fill"));
        match f.and_then(|mut f| f.write_all(&chunk)) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "never ran out of space");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    let mut n = 0;
    while fs::write(m.path(&format!("small{n}")), b"x").is_ok() && n < 100_000 {
        n += 1;
    }
    assert_eq!(errno(fs::create_dir(m.path("one-more-dir"))), libc::ENOSPC);
    fs::remove_file(m.path("fill")).unwrap();
    fs::write(m.path("after"), vec![1u8; 1 << 20]).unwrap();
    m.unmount();
    let (code, out) = fsck(&m.image, "-n");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn large_directory_becomes_hashed_and_stays_consistent() {
    let mut m = Mount::new("128M", "");
    fs::create_dir(m.path("big")).unwrap();
    let n = 6000;
    for i in 0..n {
        File::create(m.path(&format!("big/entry-{i:05}"))).unwrap();
    }
    let listed = fs::read_dir(m.path("big")).unwrap().count();
    assert_eq!(listed, n);
    for i in (0..n).step_by(2) {
        fs::remove_file(m.path(&format!("big/entry-{i:05}"))).unwrap();
    }
    m.unmount();
    assert_eq!(fsck(&m.image, "-n").0, 0);
    m.mount("");
    let mut names: Vec<String> = fs::read_dir(m.path("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (1..n).step_by(2).map(|i| format!("entry-{i:05}")).collect();
    assert_eq!(names, want);
    assert!(m.path("big/entry-00001").exists());
    assert!(!m.path("big/entry-00000").exists());
    assert_eq!(errno(fs::remove_dir(m.path("big"))), libc::ENOTEMPTY);
}

#[test]
fn append_direct_io_mmap_and_locks() {
    let m = Mount::new("32M", "");
    let p = m.path("f");
    fs::write(&p, b"start").unwrap();
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"-appended").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"start-appended");
    // O_DIRECT with aligned buffers.
    let mut d = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("direct"))
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(8192, 4096).unwrap();
    // SAFETY: layout is non-zero sized; freed below.
    let ptr = unsafe { std::alloc::alloc(layout) };
    // SAFETY: ptr points at 8192 writable bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 8192) };
    buf.fill(0x5a);
    d.write_all(buf).unwrap();
    d.seek(SeekFrom::Start(0)).unwrap();
    buf.fill(0);
    d.read_exact(buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    // Shared writable mmap: stores reach the file.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("mapped"))
        .unwrap();
    f.set_len(8192).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: mapping 8192 bytes of a file that is 8192 bytes long.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: the mapping is 8192 bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(b"via mmap".as_ptr(), map.cast::<u8>().add(5000), 8);
        assert_eq!(libc::msync(map, 8192, libc::MS_SYNC), 0);
        libc::munmap(map, 8192);
    }
    let mut back = [0u8; 8];
    File::open(m.path("mapped"))
        .unwrap()
        .read_exact_at(&mut back, 5000)
        .unwrap();
    assert_eq!(&back, b"via mmap");
    // flock conflicts between two open files.
    let f1 = File::open(&p).unwrap();
    let f2 = File::open(&p).unwrap();
    // SAFETY: valid fds.
    unsafe {
        assert_eq!(
            libc::flock(f1.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            0
        );
        assert_eq!(
            libc::flock(f2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
    }
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EWOULDBLOCK)
    );
}

#[test]
fn statfs_reports_sizes() {
    let m = Mount::new("64M", "");
    let c = cpath(&m.dir);
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    assert_eq!(s.f_bsize, 4096);
    assert!(s.f_blocks > 10_000 && s.f_bfree <= s.f_blocks && s.f_bfree > 10_000);
    assert_eq!(s.f_namemax, 255);
    fs::write(m.path("f"), vec![0u8; 1 << 20]).unwrap();
    let mut t: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut t) }, 0);
    assert_eq!(
        s.f_bfree - t.f_bfree,
        256 + 1,
        "256 data blocks and the inode block"
    );
}

#[test]
fn rewinddir_sees_new_entries_and_special_files_work() {
    let m = Mount::new("32M", "");
    fs::write(m.path("one"), b"").unwrap();
    let c = cpath(&m.dir);
    // SAFETY: opendir/readdir/rewinddir/closedir on a valid path, used in order.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null());
        let count = |d: *mut libc::DIR| {
            let mut n = 0;
            while !libc::readdir(d).is_null() {
                n += 1;
            }
            n
        };
        assert_eq!(count(d), 3);
        fs::write(m.path("two"), b"").unwrap();
        libc::rewinddir(d);
        assert_eq!(count(d), 4, "after rewinddir the new entry is listed");
        libc::closedir(d);
    }
    let fifo = cpath(&m.path("fifo"));
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(m.path("fifo")).unwrap().file_type()
    ));
    let sock = cpath(&m.path("sock"));
    // SAFETY: valid path; a socket node needs no device number.
    assert_eq!(
        unsafe { libc::mknod(sock.as_ptr(), libc::S_IFSOCK | 0o600, 0) },
        0
    );
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &fs::metadata(m.path("sock")).unwrap().file_type()
    ));
}

#[test]
fn writes_by_other_users_clear_setuid_and_ro_mounts_refuse_writes() {
    let mut m = Mount::new("32M", "allow_other");
    fs::write(m.path("prog"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(m.path("prog"), fs::Permissions::from_mode(0o4777)).unwrap();
    let p = m.path("prog");
    std::thread::spawn(move || {
        // SAFETY: changes only this thread's filesystem ids.
        unsafe {
            libc::setfsgid(1000);
            libc::setfsuid(1000);
        }
        OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"echo hi\n")
            .unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(
        fs::metadata(m.path("prog")).unwrap().mode() & 0o7777,
        0o0777,
        "setuid is dropped on write"
    );
    m.unmount();
    m.mount("ro,noexec,nodev");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == m.dir.to_str())
        .unwrap();
    let flags = line.split(' ').nth(5).unwrap();
    assert!(
        flags.contains("ro") && flags.contains("noexec") && flags.contains("nodev"),
        "{line}"
    );
    assert_eq!(fs::read(m.path("prog")).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(errno(fs::write(m.path("new"), b"x")), libc::EROFS);
    assert_eq!(errno(fs::remove_file(m.path("prog"))), libc::EROFS);
}

#[test]
fn the_mount_reads_ahead_a_whole_request() {
    let m = Mount::new("32M", "");
    let dev = fs::metadata(m.path("")).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    // 1 MiB, the largest FUSE request we take (the kernel's default is 128 KiB).
    assert_eq!(fs::read_to_string(&knob).unwrap().trim(), "1024", "{knob}");
}

/// Runs `f` on a thread whose filesystem ids are uid/gid 1000 (no CAP_FSETID).
fn as_user_1000(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: changes only this thread's filesystem ids.
        unsafe {
            libc::setfsgid(1000);
            libc::setfsuid(1000);
        }
        f();
    })
    .join()
    .unwrap();
}

#[test]
fn truncate_chown_and_write_drop_setuid_setgid_and_file_capabilities_as_linux_does() {
    let m = Mount::new("32M", "allow_other");
    let p = m.path("prog");
    fs::write(&p, b"#!/bin/sh\n").unwrap();
    let c = cpath(&p);
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    let chmod = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    // A valid file capability (revision 2): cap_net_bind_service permitted.
    let mut cap = Vec::new();
    for v in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&v.to_le_bytes());
    }
    let name = CString::new("security.capability").unwrap();
    let set_cap = || {
        // SAFETY: valid pointers and lengths.
        let r =
            unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), cap.as_ptr().cast(), cap.len(), 0) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    };
    let has_cap = || {
        let mut buf = [0u8; 64];
        // SAFETY: buf has 64 bytes.
        unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 64) > 0 }
    };

    // Truncate by an unprivileged user: setuid, group-executable setgid and caps go.
    chmod(&p, 0o6777);
    set_cap();
    assert!(has_cap());
    let q = p.clone();
    as_user_1000(move || {
        OpenOptions::new()
            .write(true)
            .open(&q)
            .unwrap()
            .set_len(4)
            .unwrap();
    });
    assert_eq!(mode(&p), 0o0777);
    assert!(!has_cap(), "file capabilities survived a truncate");

    // A write by root (CAP_FSETID) keeps them.
    chmod(&p, 0o6777);
    OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert_eq!(mode(&p), 0o6777);

    // Write by an unprivileged user: setgid without group execute stays (it marks
    // mandatory locking, not privilege); caps go.
    chmod(&p, 0o6767);
    set_cap();
    let q = p.clone();
    as_user_1000(move || {
        OpenOptions::new()
            .append(true)
            .open(&q)
            .unwrap()
            .write_all(b"y")
            .unwrap();
    });
    assert_eq!(mode(&p), 0o2767);
    assert!(!has_cap(), "file capabilities survived a write");

    // chown drops them even for root.
    chmod(&p, 0o6777);
    std::os::unix::fs::chown(&p, Some(0), Some(0)).unwrap();
    assert_eq!(mode(&p), 0o0777);
}

/// Requests the daemon reads from /dev/fuse while `f` runs (strace counts its reads).
fn fuse_requests_during(m: &Mount, f: impl FnOnce()) -> u64 {
    let strace = Command::new("strace")
        .args(["-f", "-c", "-e", "trace=read", "-p"])
        .arg(m.daemon_pid().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace (scripts/install-deps.sh installs it)");
    std::thread::sleep(std::time::Duration::from_millis(500));
    f();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let out = strace.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stderr);
    summary
        .lines()
        .find(|l| l.trim_end().ends_with(" read"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no read count in strace's summary:\n{summary}"))
}

#[test]
fn a_write_costs_one_round_trip_not_a_capability_lookup_too() {
    let m = Mount::new("32M", "");
    let p = m.path("f");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&p)
        .unwrap();
    let block = vec![7u8; 4096];
    let n = fuse_requests_during(&m, || {
        for i in 0..50u64 {
            f.write_all_at(&block, i * 4096).unwrap();
        }
    });
    // 50 WRITEs; without FUSE_HANDLE_KILLPRIV_V2 each came with a GETXATTR of
    // security.capability (100).
    assert!(n < 75, "{n} requests for 50 writes");
}
