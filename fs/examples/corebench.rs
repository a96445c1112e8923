//! Measures the filesystem core alone (no FUSE): `cargo run --release --example corebench`.

use std::sync::Arc;
use std::time::Instant;

use tandem_fs::format::LockProto;
use tandem_fs::fs::{Ctx, Fs, FsOptions, ROOT_INO};
use tandem_fs::mkfs::{mkfs, MkfsOptions};
use tandem_fs::{BlockDevice, FileDevice};

fn main() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = tmp.path().join("img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, true).unwrap());
    let opts = MkfsOptions {
        lock_table: "b:c".into(),
        journals: 1,
        journal_mib: None,
        block_size: 4096,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone(), &opts).unwrap();
    let (fs, _) = Fs::mount(dev, FsOptions::default()).unwrap();
    let ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 0,
    };
    let d = fs.mkdir(ctx, ROOT_INO, b"d", 0o755, 0).unwrap();
    let n = 20_000;
    let block = vec![1u8; 4096];
    let t = Instant::now();
    for i in 0..n {
        let name = format!("f{i}");
        assert!(fs.lookup(d.ino, name.as_bytes()).is_err());
        let a = fs.mknod(ctx, d.ino, name.as_bytes(), 0o644, 0, 0).unwrap();
        fs.open(a.ino).unwrap();
        fs.write(a.ino, 0, &block).unwrap();
        fs.release(a.ino);
        if i % 5000 == 0 {
            fs.commit().unwrap();
        }
    }
    println!(
        "core create+4KiB: {:.0} files/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    for i in 0..n {
        let a = fs.lookup(d.ino, format!("f{i}").as_bytes()).unwrap();
        fs.open(a.ino).unwrap();
        let _ = fs.read(a.ino, 0, 8192).unwrap();
        fs.release(a.ino);
    }
    println!(
        "core lookup+open+read: {:.0} files/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    fs.commit().unwrap();
    println!("commit: {:?}", t.elapsed());
}
