use super::*;
use tandem_common::ClusterConfig;

fn config(dir: &Path, size: &str) -> ClusterConfig {
    ClusterConfig::parse(&format!(
        r#"
[cluster]
name = "t"
secret = "test-secret-123"
state-dir = "{d}/state"
run-dir = "{d}/run"
[[node]]
name = "a"
id = 1
address = "127.0.0.1"
[[node]]
name = "b"
id = 2
address = "127.0.0.2"
[[resource]]
name = "r0"
size = "{size}"
[resource.on.a]
disk = "{d}/a.img"
[resource.on.b]
disk = "{d}/b.img"
meta-disk = "{d}/b.meta"
[[resource]]
name = "r1"
[resource.on.a]
disk = "{d}/a.img"
"#,
        d = dir.display()
    ))
    .unwrap()
}

#[test]
fn create_open_internal_and_external() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "4MiB");
    let r = c.resource("r0").unwrap();
    let sb = create(&c, r, "a", false).unwrap();
    assert_eq!(sb.usable_size_bytes, 4 << 20);
    assert_eq!(sb.disk_state, DiskState::Inconsistent);
    let (store, back) = open(&c, r, "a").unwrap();
    assert_eq!(back, sb);
    // A second create-md refuses without --force.
    assert!(matches!(
        create(&c, r, "a", false),
        Err(MetaError::Exists { .. })
    ));
    // Updates alternate slots and the newest wins.
    let mut s = back.clone();
    s.current_uuid = 77;
    store.write(&mut s).unwrap();
    assert_eq!(store.read().unwrap().current_uuid, 77);
    // External metadata.
    let sb = create(&c, r, "b", false).unwrap();
    assert_eq!(sb.md_offset, 0);
    assert_eq!(open(&c, r, "b").unwrap().1.usable_size_bytes, 4 << 20);
}

#[test]
fn torn_slot_falls_back_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "4MiB");
    let r = c.resource("r0").unwrap();
    create(&c, r, "a", false).unwrap();
    let (store, mut sb) = open(&c, r, "a").unwrap();
    sb.current_uuid = 5;
    store.write(&mut sb).unwrap();
    // Corrupt the slot just written: the previous one must be returned.
    let slot = sb.seq % 2;
    store
        .file
        .write_all_at(&[0xFF; 100], store.base + slot * SLOT_BYTES as u64 + 50)
        .unwrap();
    let back = store.read().unwrap();
    assert_eq!(back.current_uuid, 0);
    // Both corrupt: clear error, no panic.
    store
        .file
        .write_all_at(
            &[0xFF; 100],
            store.base + (1 - slot) * SLOT_BYTES as u64 + 50,
        )
        .unwrap();
    let e = store.read().unwrap_err().to_string();
    assert!(e.contains("corrupt"), "{e}");
}

#[test]
fn refuses_disk_of_another_resource_and_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "4MiB");
    create(&c, c.resource("r0").unwrap(), "a", false).unwrap();
    let e = open(&c, c.resource("r1").unwrap(), "a")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("resource `r0`"), "{e}");
    // A tiny disk is refused with a size message.
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, vec![0u8; 64 * 1024]).unwrap();
    let text = format!(
        "[cluster]\nname = \"t\"\nsecret = \"test-secret-123\"\n[[node]]\nname = \"a\"\nid = 1\naddress = \"127.0.0.1\"\n[[resource]]\nname = \"r\"\n[resource.on.a]\ndisk = \"{}\"\n",
        tiny.display()
    );
    let c2 = ClusterConfig::parse(&text).unwrap();
    let e = create(&c2, c2.resource("r").unwrap(), "a", false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("too small"), "{e}");
    // Not-metadata reads as "run create-md".
    let e = open(&c2, c2.resource("r").unwrap(), "a")
        .err()
        .map(|e| e.to_string());
    assert!(e.is_some());
}
