//! fsck and mount on damaged images: bit flips in metadata and truncated images must give
//! reports or clear errors, never panics; a repaired image must check clean and mount.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_fs::format::{self, LockProto};
use tandem_fs::fs::{Ctx, Fs, FsOptions, ROOT_INO};
use tandem_fs::fsck::{fsck, FsckOptions};
use tandem_fs::mkfs::{mkfs, MkfsOptions};
use tandem_fs::{BlockDevice, FaultDevice};

const CTX: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};
const BS: usize = 4096;

/// A small filesystem using every metadata structure: inline and extent files, extent
/// leaves, a hashed directory, symlinks, hard links and xattrs.
fn populated_image() -> Vec<u8> {
    let dev = Arc::new(FaultDevice::new(24 << 20));
    let opts = MkfsOptions {
        lock_table: "t:fsck".into(),
        journals: 2,
        journal_mib: Some(1),
        block_size: BS as u32,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    let d = fs.mkdir(CTX, ROOT_INO, b"dir", 0o755, 0).unwrap();
    for i in 0..400 {
        let f = fs
            .mknod(
                CTX,
                d.ino,
                format!("file-with-a-longish-name-{i}").as_bytes(),
                0o644,
                0,
                0,
            )
            .unwrap();
        fs.write(f.ino, 0, format!("content {i}").as_bytes())
            .unwrap();
    }
    let frag = fs.mknod(CTX, ROOT_INO, b"fragmented", 0o644, 0, 0).unwrap();
    for k in 0..400u64 {
        fs.write(frag.ino, k * 2 * BS as u64, &[k as u8; 100])
            .unwrap();
    }
    let big = fs.mknod(CTX, ROOT_INO, b"big", 0o644, 0, 0).unwrap();
    fs.write(big.ino, 0, &vec![7u8; 300_000]).unwrap();
    fs.setxattr(big.ino, b"user.a", b"value", 0).unwrap();
    fs.symlink(CTX, ROOT_INO, b"link", b"big").unwrap();
    fs.link(big.ino, d.ino, b"hardlink").unwrap();
    let sub = fs.mkdir(CTX, d.ino, b"sub", 0o755, 0).unwrap();
    fs.mknod(CTX, sub.ino, b"leaf", 0o600, 0, 0).unwrap();
    fs.shutdown().unwrap();
    dev.image()
}

fn metadata_blocks(img: &[u8]) -> Vec<usize> {
    (0..img.len() / BS)
        .filter(|&b| format::peek_type(&img[b * BS..(b + 1) * BS]).is_some())
        .collect()
}

fn check(img: Vec<u8>, repair: bool) -> Result<tandem_fs::fsck::FsckReport, tandem_fs::FsError> {
    let mut sink = |_: &str| {};
    fsck(
        Arc::new(FaultDevice::from_image(img)),
        FsckOptions { repair },
        &mut sink,
    )
}

/// Walks and reads everything; errors are fine, panics are not.
fn read_everything(fs: &Fs) -> usize {
    let mut n = 0;
    let mut stack = vec![ROOT_INO];
    while let Some(ino) = stack.pop() {
        let Ok(fh) = fs.opendir(ino) else { continue };
        for e in fs.readdir(fh, 2).unwrap_or_default() {
            n += 1;
            if let Ok(a) = fs.getattr(e.ino) {
                if a.kind == tandem_fs::fs::FileKind::Dir {
                    stack.push(e.ino);
                } else {
                    let _ = fs.read(e.ino, 0, 1 << 20);
                    let _ = fs.listxattr(e.ino);
                }
            }
        }
        fs.releasedir(fh);
    }
    n
}

#[test]
fn pristine_image_is_clean() {
    let r = check(populated_image(), false).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.exit_code(), 0);
    assert!(r.files >= 403 && r.dirs == 3, "{r:?}");
}

#[test]
fn bit_flips_are_detected_and_repaired_without_panics() {
    let base = populated_image();
    let meta = metadata_blocks(&base);
    let seed = std::env::var("TANDEM_FSCK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut detected = 0;
    for round in 0..120 {
        let mut img = base.clone();
        for _ in 0..rng.gen_range(1..4) {
            let blk = if rng.gen_bool(0.85) {
                meta[rng.gen_range(0..meta.len())]
            } else {
                rng.gen_range(0..img.len() / BS)
            };
            let bit = rng.gen_range(0..BS * 8);
            img[blk * BS + bit / 8] ^= 1 << (bit % 8);
        }
        let report = check(img.clone(), false);
        if report.as_ref().map_or(true, |r| !r.problems.is_empty()) {
            detected += 1;
        }
        // Mounting the damaged image must fail cleanly or work; reading must not panic.
        if let Ok((fs, _)) = Fs::mount(
            Arc::new(FaultDevice::from_image(img.clone())),
            FsOptions::default(),
        ) {
            read_everything(&fs);
        }
        let dev = Arc::new(FaultDevice::from_image(img));
        let mut sink = |_: &str| {};
        let Ok(_) = fsck(dev.clone(), FsckOptions { repair: true }, &mut sink) else {
            continue;
        };
        let after = check(dev.image(), false)
            .unwrap_or_else(|e| panic!("round {round}: re-check after repair failed: {e}"));
        assert!(
            after.problems.is_empty(),
            "round {round}: problems remain after repair: {:?}",
            after.problems
        );
        let (fs, _) = Fs::mount(dev, FsOptions::default())
            .unwrap_or_else(|e| panic!("round {round}: repaired image does not mount: {e}"));
        read_everything(&fs);
        fs.shutdown().unwrap();
    }
    assert!(detected > 80, "only {detected} of 120 corruptions detected");
}

#[test]
fn truncated_and_foreign_images_give_clear_errors() {
    let base = populated_image();
    let used_len = format::Superblock::decode(&base[..BS]).unwrap().block_count as usize * BS;
    for len in [0, 100, 4096, 8192, base.len() / 2, used_len - BS] {
        let img = base[..len].to_vec();
        let err = check(img.clone(), false).expect_err("truncated image must not check clean");
        let msg = err.to_string();
        assert!(
            msg.contains("too small") || msg.contains("truncated") || msg.contains("needs"),
            "{len}: {msg}"
        );
        assert!(Fs::mount(Arc::new(FaultDevice::from_image(img)), FsOptions::default()).is_err());
    }
    let zeros = vec![0u8; 1 << 20];
    let err = Fs::mount(
        Arc::new(FaultDevice::from_image(zeros)),
        FsOptions::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("not a tandem filesystem"), "{err}");
}

#[test]
fn too_new_format_version_is_refused() {
    let mut img = populated_image();
    format::put_u32(&mut img, 24, format::FORMAT_VERSION + 1);
    format::seal(&mut img[..BS]);
    let err = Fs::mount(Arc::new(FaultDevice::from_image(img)), FsOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("newer than supported"), "{err}");
}

#[test]
fn orphans_go_to_lost_and_found() {
    let mut img = populated_image();
    // Zero the "dir" directory's entry area in the root inode: its whole subtree is orphaned.
    let sb = format::Superblock::decode(&img[..BS]).unwrap();
    let root = sb.root_block as usize * BS;
    let payload = root + tandem_fs::inode::INODE_PAYLOAD;
    let used = format::get_u32(&img, root + 136) as usize;
    let ents = img[payload..payload + used].to_vec();
    // Keep only entries not named "dir".
    let mut kept = Vec::new();
    let mut p = 0;
    while p < ents.len() {
        let n = ents[p + 13] as usize;
        if &ents[p + 14..p + 14 + n] != b"dir" {
            kept.extend_from_slice(&ents[p..p + 14 + n]);
        }
        p += 14 + n;
    }
    img[payload..payload + used].fill(0);
    img[payload..payload + kept.len()].copy_from_slice(&kept);
    format::put_u32(&mut img, root + 136, kept.len() as u32);
    let entries = format::get_u64(&img, root + 144);
    format::put_u64(&mut img, root + 144, entries - 1);
    format::seal(&mut img[root..root + BS]);
    let r = check(img.clone(), false).unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains("orphan")),
        "{:?}",
        r.problems
    );
    let dev = Arc::new(FaultDevice::from_image(img));
    let mut sink = |_: &str| {};
    fsck(dev.clone(), FsckOptions { repair: true }, &mut sink).unwrap();
    let (fs, _) = Fs::mount(dev, FsOptions::default()).unwrap();
    let lf = fs.lookup(ROOT_INO, b"lost+found").unwrap();
    let fh = fs.opendir(lf.ino).unwrap();
    let names: Vec<Vec<u8>> = fs
        .readdir(fh, 2)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names.len(), 1, "the orphaned directory is attached once");
    let moved = fs.lookup(lf.ino, &names[0]).unwrap();
    assert!(fs.lookup(moved.ino, b"file-with-a-longish-name-7").is_ok());
}

#[test]
fn repair_mode_replays_a_dirty_journal_first() {
    let dev = Arc::new(FaultDevice::new(16 << 20));
    let opts = MkfsOptions {
        lock_table: "t:replay".into(),
        journals: 1,
        journal_mib: Some(1),
        block_size: BS as u32,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    for i in 0..50 {
        let f = fs
            .mknod(CTX, ROOT_INO, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        fs.write(f.ino, 0, &vec![i as u8; 5000]).unwrap();
    }
    fs.fsync(ROOT_INO).unwrap();
    // Power loss: the journal holds the only durable copy of the new metadata.
    let img = dev.crash_image(tandem_fs::CrashMode::DropAll, 0);
    let ro = Fs::mount(
        Arc::new(FaultDevice::from_image(img.clone())),
        FsOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert!(ro.err().unwrap().to_string().contains("needs replay"));
    let dev2 = Arc::new(FaultDevice::from_image(img));
    let mut sink = |_: &str| {};
    let rep = fsck(dev2.clone(), FsckOptions { repair: true }, &mut sink).unwrap();
    assert_eq!(rep.journals_replayed, 1);
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    let again = check(dev2.image(), false).unwrap();
    assert!(again.problems.is_empty() && again.files == 50, "{again:?}");
}

#[test]
fn misplaced_hash_entries_are_rehashed_and_stale_inline_bytes_zeroed() {
    let dev = Arc::new(FaultDevice::new(16 << 20));
    let opts = MkfsOptions {
        lock_table: "t:hash".into(),
        journals: 1,
        journal_mib: Some(1),
        block_size: 1024,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    let d = fs.mkdir(CTX, ROOT_INO, b"d", 0o755, 0).unwrap();
    for i in 0..400 {
        fs.mknod(CTX, d.ino, format!("n{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
    }
    let small = fs.mknod(CTX, ROOT_INO, b"small", 0o644, 0, 0).unwrap();
    fs.write(small.ino, 0, b"0123456789").unwrap();
    fs.shutdown().unwrap();
    let mut img = dev.image();
    // Swap the first and last hash-table pointers of "d": entries become unreachable.
    let at = d.ino as usize * 1024;
    let payload = at + tandem_fs::inode::INODE_PAYLOAD;
    let depth = format::get_u16(&img, at + 140) as usize;
    assert!(depth >= 2, "the directory is hashed with a real table");
    let last = payload + ((1 << depth) - 1) * 8;
    let (a, b) = (format::get_u64(&img, payload), format::get_u64(&img, last));
    assert_ne!(a, b);
    format::put_u64(&mut img, payload, b);
    format::put_u64(&mut img, last, a);
    format::seal(&mut img[at..at + 1024]);
    // Garbage after the end of an inline file.
    let s = small.ino as usize * 1024;
    img[s + tandem_fs::inode::INODE_PAYLOAD + 20] = 0x55;
    format::seal(&mut img[s..s + 1024]);
    let mut sink = |_: &str| {};
    let dev2 = Arc::new(FaultDevice::from_image(img));
    let rep = fsck(dev2.clone(), FsckOptions { repair: true }, &mut sink).unwrap();
    assert!(
        rep.problems.iter().any(|p| p.contains("hash")),
        "{:?}",
        rep.problems
    );
    assert!(
        rep.problems.iter().any(|p| p.contains("stale bytes")),
        "{:?}",
        rep.problems
    );
    let again = check(dev2.image(), false).unwrap();
    assert!(again.problems.is_empty(), "{:?}", again.problems);
    let (fs, _) = Fs::mount(dev2, FsOptions::default()).unwrap();
    for i in 0..400 {
        fs.lookup(d.ino, format!("n{i}").as_bytes())
            .unwrap_or_else(|e| panic!("n{i}: {e}"));
    }
    fs.setattr(
        small.ino,
        tandem_fs::fs::SetAttr {
            size: Some(30),
            ..Default::default()
        },
    )
    .unwrap();
    let mut want = b"0123456789".to_vec();
    want.resize(30, 0);
    assert_eq!(fs.read(small.ino, 0, 100).unwrap(), want);
}

#[test]
fn read_errors_surface_as_eio_not_panics() {
    let base = populated_image();
    let meta = metadata_blocks(&base);
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..40 {
        let dev = Arc::new(FaultDevice::from_image(base.clone()));
        for _ in 0..3 {
            let blk = meta[rng.gen_range(0..meta.len())] as u64;
            dev.fail_reads(blk * BS as u64, BS as u64);
        }
        match Fs::mount(dev.clone(), FsOptions::default()) {
            Ok((fs, _)) => {
                read_everything(&fs);
                // Writes after read errors either work or fail cleanly.
                let _ = fs.mknod(CTX, ROOT_INO, b"after-errors", 0o644, 0, 0);
                let _ = fs.shutdown();
            }
            Err(e) => assert_eq!(e.errno(), libc::EIO, "{e}"),
        }
        let mut sink = |_: &str| {};
        if let Err(e) = fsck(dev, FsckOptions { repair: false }, &mut sink) {
            assert!(matches!(e, tandem_fs::FsError::Io(_)), "{e}");
        }
    }
}

#[test]
fn a_malformed_acl_is_reported_and_removed() {
    use tandem_fs::acl::{self, Acl, Entry};
    let dev = Arc::new(FaultDevice::new(24 << 20));
    let opts = MkfsOptions {
        lock_table: "t:acl".into(),
        journals: 1,
        journal_mib: Some(1),
        block_size: BS as u32,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    let acl_opts = FsOptions {
        posix_acl: true,
        ..FsOptions::default()
    };
    let (fs, _) = Fs::mount(dev.clone(), acl_opts.clone()).unwrap();
    let f = fs.mknod(CTX, ROOT_INO, b"f", 0o600, 0, 0).unwrap();
    fs.setxattr(f.ino, b"user.keep", b"me", 0).unwrap();
    let e = |tag, perm, id| Entry { tag, perm, id };
    let a = Acl::from_entries(vec![
        e(acl::USER_OBJ, 6, acl::UNDEFINED_ID),
        e(acl::USER, 4, 0x00AB_CDEF),
        e(acl::GROUP_OBJ, 0, acl::UNDEFINED_ID),
        e(acl::MASK, 4, acl::UNDEFINED_ID),
        e(acl::OTHER, 0, acl::UNDEFINED_ID),
    ])
    .unwrap();
    let bytes = a.to_bytes();
    fs.setxattr(f.ino, acl::ACCESS, &bytes, 0).unwrap();
    assert_eq!(
        fs.getattr(f.ino).unwrap().perm,
        0o640,
        "mask in the group bits"
    );
    // One whose xattr block holds nothing else: repair frees the block.
    let only = fs.mknod(CTX, ROOT_INO, b"only", 0o600, 0, 0).unwrap();
    fs.setxattr(only.ino, acl::ACCESS, &bytes, 0).unwrap();
    assert_eq!(fs.getxattr(f.ino, acl::ACCESS).unwrap(), bytes);
    // A malformed value never gets stored.
    assert!(fs
        .setxattr(f.ino, acl::ACCESS, &bytes[..bytes.len() - 2], 0)
        .is_err());
    fs.shutdown().unwrap();
    drop(fs);

    // Break the stored ACL's version behind the filesystem's back, with a valid checksum.
    // (The journal holds copies of the block too, with the same header: break them all.)
    let mut img = dev.image();
    let mut broken = 0;
    for blk in (0..img.len() / BS).map(|b| b * BS) {
        if format::peek_type(&img[blk..blk + BS]) != Some(format::BlockType::Xattr as u16) {
            continue;
        }
        if let Some(at) = img[blk..blk + BS]
            .windows(bytes.len())
            .position(|w| w == bytes.as_slice())
        {
            img[blk + at] = 3;
            format::seal(&mut img[blk..blk + BS]);
            broken += 1;
        }
    }
    assert!(broken >= 2, "both ACLs' xattr blocks");
    let r = check(img.clone(), false).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("system.posix_acl_access is invalid")),
        "{:?}",
        r.problems
    );
    let dev = Arc::new(FaultDevice::from_image(img));
    let mut sink = |_: &str| {};
    fsck(dev.clone(), FsckOptions { repair: true }, &mut sink).unwrap();
    let r = check(dev.image(), false).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let (fs, _) = Fs::mount(dev, acl_opts).unwrap();
    assert!(matches!(
        fs.getxattr(f.ino, acl::ACCESS),
        Err(tandem_fs::FsError::NoXattr)
    ));
    assert_eq!(fs.getxattr(f.ino, b"user.keep").unwrap(), b"me");
    assert!(fs.listxattr(only.ino).unwrap().is_empty());
}
