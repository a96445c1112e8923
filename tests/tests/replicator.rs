//! Replicator scenarios with real processes in network namespaces and real NBD clients
//! (nbdcopy from libnbd-bin, qemu-io from qemu-utils).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use tandem_replicator::nbd::client::NbdClient;
use tandem_tests::oracle::{block_data, WriteLog, BLOCK_BYTES};
use tandem_tests::{file_crc, run_tool, Cluster, ResourceSpec};

const VOLUME_BYTES: u64 = 32 << 20;

fn random_file(c: &Cluster, name: &str, len: usize, seed: u64) -> std::path::PathBuf {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    let p = c.dir().join(name);
    std::fs::write(&p, &data).unwrap();
    p
}

/// Every node's export and every backing file hold exactly what was written on node 0.
fn assert_all_copies(c: &Cluster, expect_crc: u32) {
    for i in 0..c.node_count() {
        let out = c.dir().join(format!("readback-n{}.bin", i + 1));
        let (ok, text) =
            run_tool("nbdcopy", &[&c.nbd_uri(i, "www"), out.to_str().unwrap()]).unwrap();
        assert!(ok, "nbdcopy from n{} failed: {text}", i + 1);
        assert_eq!(
            file_crc(&out, 0, VOLUME_BYTES).unwrap(),
            expect_crc,
            "export of n{} differs",
            i + 1
        );
        assert_eq!(
            file_crc(&c.disk_path(i, "www"), 0, VOLUME_BYTES).unwrap(),
            expect_crc,
            "backing file of n{} differs",
            i + 1
        );
    }
}

fn volume_crc_of(prefix: &std::path::Path) -> u32 {
    let mut buf = std::fs::read(prefix).unwrap();
    buf.resize(VOLUME_BYTES as usize, 0);
    crc32fast::hash(&buf)
}

#[test]
fn two_nodes_nbdcopy_data_identical_everywhere_and_secondary_refuses_writes() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    let data = random_file(&c, "data.bin", 12 << 20, 1);
    let (ok, text) = run_tool("nbdcopy", &[data.to_str().unwrap(), &c.nbd_uri(0, "www")]).unwrap();
    assert!(ok, "nbdcopy to n1 failed: {text}");
    assert_all_copies(&c, volume_crc_of(&data));

    // The Secondary refuses writes with EPERM, and nothing changes anywhere.
    let (ok, text) = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &c.nbd_uri(1, "www"),
            "-c",
            "write -P 0x55 0 4096",
        ],
    )
    .unwrap();
    assert!(
        !ok || text.contains("Operation not permitted"),
        "write on Secondary was accepted: {text}"
    );
    assert!(text.contains("Operation not permitted"), "{text}");
    assert_all_copies(&c, volume_crc_of(&data));

    // status --json is JSON with DRBD's words.
    let st = c.status_json(0).unwrap();
    assert_eq!(st[0]["role"], "Primary");
    assert_eq!(st[0]["disk-state"], "UpToDate");
    assert_eq!(st[0]["connections"][0]["connection-state"], "Connected");
    assert_eq!(st[0]["connections"][0]["replication-state"], "Established");
    assert_eq!(st[0]["connections"][0]["peer-disk-state"], "UpToDate");
    assert_eq!(st[0]["connections"][0]["peer-role"], "Secondary");
    let text = c.adm(1, &["status"]).unwrap();
    assert!(
        text.contains("www role:Secondary") && text.contains("n1 role:Primary"),
        "{text}"
    );
}

#[test]
fn three_nodes_forced_primary_full_sync_then_replicates() {
    let mut c = Cluster::builder().nodes(3).start().unwrap();
    for i in 0..3 {
        c.adm(i, &["create-md", "www"]).unwrap();
        c.start_replicator(i).unwrap();
        c.adm(i, &["up", "www"]).unwrap();
    }
    c.wait_connected("www").unwrap();
    // Without UpToDate data, promotion is refused with a clear message.
    let out = c.tandemadm(0, &["primary", "www"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    // Some data on n1's disk before forcing: the sync must carry it to the others.
    let seed = random_file(&c, "seed.bin", 4 << 20, 2);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.disk_path(0, "www"))
            .unwrap();
        f.write_all(&std::fs::read(&seed).unwrap()).unwrap();
    }
    c.adm(0, &["primary", "--force", "www"]).unwrap();
    let events = c.adm(0, &["events", "--now", "www"]).unwrap();
    assert!(
        events.contains("exists resource name:www role:Primary"),
        "{events}"
    );
    c.wait_sync_all("www", 120).unwrap();
    let st = c.status_json(1).unwrap();
    assert!(st[0]["resync-received-bytes"].as_u64().unwrap() >= VOLUME_BYTES);
    assert_all_copies(&c, volume_crc_of(&seed));
    let data = random_file(&c, "data.bin", 8 << 20, 3);
    let (ok, text) = run_tool("nbdcopy", &[data.to_str().unwrap(), &c.nbd_uri(0, "www")]).unwrap();
    assert!(ok, "{text}");
    assert_all_copies(&c, volume_crc_of(&data));
}

#[test]
fn dual_primary_disjoint_concurrent_writes_leave_identical_copies() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    c.adm(1, &["primary", "www"]).unwrap();
    let uri0 = c.nbd_uri(0, "www");
    let uri1 = c.nbd_uri(1, "www");
    let a = std::thread::spawn(move || {
        run_tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                &uri0,
                "-c",
                "write -P 0x11 0 8M",
                "-c",
                "flush",
            ],
        )
        .unwrap()
    });
    let b = std::thread::spawn(move || {
        run_tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                &uri1,
                "-c",
                "write -P 0x22 8M 8M",
                "-c",
                "flush",
            ],
        )
        .unwrap()
    });
    let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
    assert!(ra.0, "{}", ra.1);
    assert!(rb.0, "{}", rb.1);
    let mut expect = vec![0x11u8; 8 << 20];
    expect.extend(vec![0x22u8; 8 << 20]);
    expect.resize(VOLUME_BYTES as usize, 0);
    let crc = crc32fast::hash(&expect);
    assert_all_copies(&c, crc);
    let st = c.status_json(0).unwrap();
    assert_eq!(st[0]["concurrent-write-conflicts"], 0);
}

#[test]
fn protocol_c_kill9_of_writer_loses_no_acknowledged_write() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    let log = Arc::new(Mutex::new(WriteLog::default()));
    let sock = c.nbd_socket(0, "www");
    let blocks = 512u64;
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut client = NbdClient::connect_unix(&sock, "www").unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(42);
            let mut generation = 0u64;
            let mut acked = 0u64;
            loop {
                let block = rng.gen_range(0..blocks);
                generation += 1;
                log.lock().unwrap().begin(block, generation);
                match client.write_at(
                    &block_data(block, generation),
                    block * BLOCK_BYTES as u64,
                    false,
                ) {
                    Ok(()) => {
                        log.lock().unwrap().ack(block, generation);
                        acked += 1;
                    }
                    Err(_) => return acked,
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    c.kill9(0);
    let acked = writer.join().unwrap();
    assert!(
        acked > 50,
        "too few writes acknowledged before the kill ({acked})"
    );
    let log = log.lock().unwrap().clone();
    // The survivor's disk and export both hold every acknowledged write.
    let disk = std::fs::read(c.disk_path(1, "www")).unwrap();
    let mut survivor = NbdClient::connect_unix(&c.nbd_socket(1, "www"), "www").unwrap();
    for block in 0..blocks {
        let at = block as usize * BLOCK_BYTES;
        log.check(block, &disk[at..at + BLOCK_BYTES])
            .unwrap_or_else(|e| panic!("backing file of n2: {e}"));
        let mut buf = vec![0u8; BLOCK_BYTES];
        survivor.read_at(&mut buf, at as u64).unwrap();
        log.check(block, &buf)
            .unwrap_or_else(|e| panic!("export of n2: {e}"));
    }
    eprintln!("{acked} acknowledged writes verified on the survivor");
}

#[test]
fn wrong_secret_and_garbage_are_refused_without_harm() {
    let mut c = Cluster::builder()
        .nodes(2)
        .resource(ResourceSpec::default())
        .wrong_secret_on(1)
        .start()
        .unwrap();
    for i in 0..2 {
        c.adm(i, &["create-md", "www"]).unwrap();
        c.start_replicator(i).unwrap();
        c.adm(i, &["up", "www"]).unwrap();
    }
    c.wait_for(Duration::from_secs(10), || {
        Ok(c.log(1, "replicatord").contains("refused peer connection")
            && c.log(1, "replicatord").contains("authentication failed")
            && c.log(0, "replicatord")
                .contains("handshake with peer failed"))
    })
    .unwrap_or_else(|e| {
        panic!(
            "no refusal logged: {e}\n{}\n{}",
            c.log(0, "replicatord"),
            c.log(1, "replicatord")
        )
    });
    let st = c.status_json(0).unwrap();
    assert_ne!(st[0]["connections"][0]["connection-state"], "Connected");
    assert!(c.log(1, "replicatord").contains("authentication failed"));

    // Random bytes to the replication port (from inside n1's namespace) and to the NBD socket.
    let peer = c.net.nodes[1].addr;
    let out = c
        .in_ns(0, &format!("for i in 1 2 3; do head -c 65536 /dev/urandom > /dev/tcp/{peer}/7788 || true; done"))
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for seed in 0..3u64 {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(c.nbd_socket(1, "www")) {
            let mut junk = vec![0u8; 4096];
            rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut junk);
            let _ = s.write_all(&junk);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.alive(1, "replicatord"), "daemon died on garbage");
    let log = c.log(1, "replicatord");
    assert!(
        log.contains("NBD client disconnected with an error"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    // Still serving: a real client gets the export, and nothing was written to the disk.
    let (ok, text) = run_tool("nbdinfo", &[&c.nbd_uri(1, "www")]).unwrap();
    assert!(ok, "{text}");
    assert_eq!(
        file_crc(&c.disk_path(1, "www"), 0, VOLUME_BYTES).unwrap(),
        crc32fast::hash(&vec![0u8; VOLUME_BYTES as usize])
    );
}

#[test]
fn protocols_a_and_b_replicate_and_flush_makes_copies_identical() {
    for protocol in ["A", "B"] {
        let mut c = Cluster::builder()
            .nodes(2)
            .resource(ResourceSpec {
                protocol: protocol.into(),
                allow_two_primaries: false,
                ..ResourceSpec::default()
            })
            .start()
            .unwrap();
        c.bring_up_fresh("www").unwrap();
        let st = c.status_json(0).unwrap();
        assert_eq!(st[0]["protocol"], protocol);
        // Without allow-two-primaries the second node may not promote.
        let out = c.tandemadm(1, &["primary", "www"]).unwrap();
        assert!(
            !out.status.success(),
            "second Primary accepted under protocol {protocol}"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("allow-two-primaries"));
        let data = random_file(&c, "data.bin", 6 << 20, 9);
        // nbdcopy flushes at the end: after it returns every copy must match.
        let (ok, text) =
            run_tool("nbdcopy", &[data.to_str().unwrap(), &c.nbd_uri(0, "www")]).unwrap();
        assert!(ok, "protocol {protocol}: {text}");
        assert_all_copies(&c, volume_crc_of(&data));
    }
}

#[test]
fn trim_and_write_zeroes_zero_every_copy() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    let uri = c.nbd_uri(0, "www");
    let (ok, text) = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x77 0 4M",
            "-c",
            "write -z 0 1M",
            "-c",
            "discard 2M 1M",
            "-c",
            "write -f -P 0x33 3M 4096",
            "-c",
            "flush",
        ],
    )
    .unwrap();
    assert!(ok, "{text}");
    let mut expect = vec![0x77u8; 4 << 20];
    expect[..1 << 20].fill(0);
    expect[2 << 20..3 << 20].fill(0);
    expect[3 << 20..(3 << 20) + 4096].fill(0x33);
    expect.resize(VOLUME_BYTES as usize, 0);
    assert_all_copies(&c, crc32fast::hash(&expect));
}
