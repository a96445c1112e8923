//! Replicator resilience with real processes in namespaces: link cuts, kill -9, split
//! brain. Quick resync must move only the blocks that changed, in the right direction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tandem_replicator::nbd::client::NbdClient;
use tandem_tests::oracle::{block_data, WriteLog, BLOCK_BYTES};
use tandem_tests::{file_crc, run_tool, Cluster};

const VOLUME_BYTES: u64 = 32 << 20;

fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn conn_state(c: &Cluster, node: usize) -> String {
    c.status_json(node).unwrap()[0]["connections"][0]["connection-state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn wait_state(c: &Cluster, node: usize, want: &str) {
    c.wait_for(Duration::from_secs(20), || Ok(conn_state(c, node) == want))
        .unwrap_or_else(|e| panic!("n{} never reached {want}: {e}", node + 1));
}

fn assert_identical(c: &Cluster) {
    let a = file_crc(&c.disk_path(0, "www"), 0, VOLUME_BYTES).unwrap();
    for i in 1..c.node_count() {
        assert_eq!(
            file_crc(&c.disk_path(i, "www"), 0, VOLUME_BYTES).unwrap(),
            a,
            "n{} differs from n1",
            i + 1
        );
    }
}

/// Writes `count` scattered 4 KiB blocks through a node's export.
fn scatter(c: &Cluster, node: usize, count: u64, seed: u64) {
    let mut client = NbdClient::connect_unix(&c.nbd_socket(node, "www"), "www").unwrap();
    for i in 0..count {
        let block = (i * 97 + seed * 13) % (VOLUME_BYTES / BLOCK_BYTES as u64);
        client
            .write_at(
                &block_data(block, seed * 1000 + i),
                block * BLOCK_BYTES as u64,
                false,
            )
            .unwrap();
    }
    client.flush().unwrap();
}

#[test]
fn link_cut_then_heal_resyncs_only_dirty_blocks_in_the_right_direction() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    scatter(&c, 0, 64, 1);
    assert_identical(&c);
    c.net.cut(1).unwrap();
    wait_state(&c, 0, "Connecting");
    scatter(&c, 0, 10, 2);
    let st = c.status_json(0).unwrap();
    assert_eq!(
        num(&st[0]["connections"][0]["out-of-sync-bytes"]),
        10 * 4096,
        "{st}"
    );
    let before = num(&c.status_json(1).unwrap()[0]["resync-received-bytes"]);
    c.net.heal(1).unwrap();
    c.adm(0, &["wait-sync", "www", "--timeout-s", "60"])
        .unwrap();
    c.adm(1, &["wait-sync", "www", "--timeout-s", "60"])
        .unwrap();
    let moved = num(&c.status_json(1).unwrap()[0]["resync-received-bytes"]) - before;
    assert_eq!(
        moved,
        10 * 4096,
        "resync moved {moved} bytes, expected only the 10 dirty blocks"
    );
    assert_eq!(
        num(&c.status_json(0).unwrap()[0]["resync-received-bytes"]),
        0,
        "wrong direction"
    );
    assert!(c.log(0, "replicatord").contains("rule=source-use-bitmap"));
    assert_identical(&c);
}

#[test]
fn killed_secondary_restarts_and_gets_only_what_it_missed() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    scatter(&c, 0, 16, 3);
    c.kill9(1);
    wait_state(&c, 0, "Connecting");
    scatter(&c, 0, 7, 4);
    // Long enough for n1's dialer to back off to its 3 s maximum.
    std::thread::sleep(Duration::from_secs(5));
    c.start_replicator(1).unwrap();
    c.adm(1, &["up", "www"]).unwrap();
    // n2 knocks: n1 dials at once instead of at the end of its backoff.
    let up = std::time::Instant::now();
    c.wait_for(Duration::from_secs(10), || {
        Ok(conn_state(&c, 0) == "Connected")
    })
    .unwrap();
    assert!(
        up.elapsed() < Duration::from_millis(2000),
        "reconnect took {:?}",
        up.elapsed()
    );
    let log = c.log(0, "replicatord");
    assert!(log.contains("knocked"), "{log}");
    // The target's own wait-sync must not return in the moment between the handshake and
    // the source's SyncStart (it shows WFBitMapT then), so the bytes are all there.
    c.adm(1, &["wait-sync", "www", "--timeout-s", "60"])
        .unwrap();
    let got = num(&c.status_json(1).unwrap()[0]["resync-received-bytes"]);
    assert_eq!(got, 7 * 4096, "restarted secondary received {got} bytes");
    c.adm(0, &["wait-sync", "www", "--timeout-s", "60"])
        .unwrap();
    assert_identical(&c);
}

#[test]
fn killed_primary_under_load_restarts_resyncs_and_loses_no_acknowledged_write() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    let log = Arc::new(Mutex::new(WriteLog::default()));
    let blocks = 256u64;
    let writer = {
        let log = log.clone();
        let sock = c.nbd_socket(0, "www");
        std::thread::spawn(move || {
            let mut client = NbdClient::connect_unix(&sock, "www").unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            for generation in 1.. {
                let block = 1000 + rng.gen_range(0..blocks);
                log.lock().unwrap().begin(block, generation);
                if client
                    .write_at(
                        &block_data(block, generation),
                        block * BLOCK_BYTES as u64,
                        false,
                    )
                    .is_err()
                {
                    return;
                }
                log.lock().unwrap().ack(block, generation);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1000));
    c.kill9(0);
    writer.join().unwrap();
    wait_state(&c, 1, "Connecting");
    // The survivor takes over and writes; then the crashed Primary comes back.
    c.adm(1, &["primary", "www"]).unwrap();
    scatter(&c, 1, 5, 6);
    c.start_replicator(0).unwrap();
    c.adm(0, &["up", "www"]).unwrap();
    c.wait_sync_all("www", 90).unwrap();
    assert_identical(&c);
    // Activity-log bounded: the crashed node gets its hot extents (the writer touched
    // blocks 1000..1256, two 4 MiB extents) plus the survivor's 5 blocks, not 32 MiB.
    let got = num(&c.status_json(0).unwrap()[0]["resync-received-bytes"]);
    assert!(
        got <= 2 * (4 << 20) + 5 * 4096,
        "crashed Primary resynced {got} bytes"
    );
    assert!(c
        .log(0, "replicatord")
        .contains("activity log of the crashed Primary"));
    // Every write the old Primary acknowledged is on both copies (the survivor's own
    // writes went to blocks outside 1000..1256).
    let log = log.lock().unwrap().clone();
    c.check_acknowledged("www", &log, 1000..1000 + blocks);
}

#[test]
fn split_brain_is_detected_and_discard_my_data_recovers() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    c.adm(1, &["primary", "www"]).unwrap();
    c.net.cut(1).unwrap();
    wait_state(&c, 0, "Connecting");
    wait_state(&c, 1, "Connecting");
    scatter(&c, 0, 5, 7);
    scatter(&c, 1, 3, 8);
    c.net.heal(1).unwrap();
    wait_state(&c, 0, "StandAlone");
    wait_state(&c, 1, "StandAlone");
    let log = c.log(0, "replicatord") + &c.log(1, "replicatord");
    assert!(log.contains("Split-Brain detected"), "{log}");
    // Copies differ and stay apart until a human decides.
    assert_ne!(
        file_crc(&c.disk_path(0, "www"), 0, VOLUME_BYTES).unwrap(),
        file_crc(&c.disk_path(1, "www"), 0, VOLUME_BYTES).unwrap()
    );
    // n2 is the victim: its changes are discarded.
    let out = c
        .tandemadm(1, &["connect", "--discard-my-data", "www"])
        .unwrap();
    assert!(
        !out.status.success(),
        "discard-my-data accepted on a Primary"
    );
    c.adm(1, &["secondary", "www"]).unwrap();
    c.adm(1, &["connect", "--discard-my-data", "www"]).unwrap();
    c.adm(0, &["connect", "www"]).unwrap();
    c.adm(1, &["wait-sync", "www", "--timeout-s", "90"])
        .unwrap();
    c.adm(0, &["wait-sync", "www", "--timeout-s", "90"])
        .unwrap();
    assert_identical(&c);
    // n1's writes survived, n2's are gone.
    let mut client = NbdClient::connect_unix(&c.nbd_socket(1, "www"), "www").unwrap();
    for i in 0..5u64 {
        let block = (i * 97 + 7 * 13) % (VOLUME_BYTES / BLOCK_BYTES as u64);
        let mut buf = vec![0u8; BLOCK_BYTES];
        client
            .read_at(&mut buf, block * BLOCK_BYTES as u64)
            .unwrap();
        assert_eq!(buf, block_data(block, 7000 + i));
    }
    let (ok, text) = run_tool("nbdinfo", &[&c.nbd_uri(1, "www")]).unwrap();
    assert!(ok, "{text}");
}

#[test]
fn isolated_primary_without_quorum_fails_writes_and_resyncs_from_the_majority() {
    let mut c = Cluster::builder()
        .nodes(3)
        .resource(tandem_tests::ResourceSpec {
            allow_two_primaries: true,
            extra: "quorum = \"majority\"\non-no-quorum = \"io-error\"\n".into(),
            ..Default::default()
        })
        .start()
        .unwrap();
    c.bring_up_fresh("www").unwrap();
    scatter(&c, 0, 8, 10);
    assert_eq!(c.status_json(0).unwrap()[0]["quorum"], true);
    c.net.cut(0).unwrap();
    c.wait_for(Duration::from_secs(20), || {
        Ok(c.status_json(0)?[0]["quorum"] == false)
    })
    .unwrap();
    // The isolated Primary refuses writes: EIO, nothing acknowledged.
    let mut client = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
    let err = client
        .write_at(&block_data(3, 99), 3 * BLOCK_BYTES as u64, false)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    // The majority carries on.
    c.wait_for(Duration::from_secs(20), || {
        Ok(c.status_json(1)?[0]["quorum"] == true)
    })
    .unwrap();
    c.adm(1, &["primary", "www"]).unwrap();
    scatter(&c, 1, 6, 11);
    c.net.heal(0).unwrap();
    c.wait_sync_all("www", 90).unwrap();
    assert_identical(&c);
    let mut check = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
    for i in 0..6u64 {
        let block = (i * 97 + 11 * 13) % (VOLUME_BYTES / BLOCK_BYTES as u64);
        let mut buf = vec![0u8; BLOCK_BYTES];
        check.read_at(&mut buf, block * BLOCK_BYTES as u64).unwrap();
        assert_eq!(
            buf,
            block_data(block, 11000 + i),
            "majority write missing on n1"
        );
    }
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn verify_finds_a_block_corrupted_behind_our_back_and_invalidate_repairs_it() {
    use std::os::unix::fs::FileExt;
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    scatter(&c, 0, 32, 12);
    let clean = c.adm(0, &["verify", "www"]).unwrap();
    assert!(clean.contains("0 block(s) out of sync"), "{clean}");
    // Flip bytes of one block on n2's disk without the daemon knowing.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.disk_path(1, "www"))
        .unwrap();
    f.write_all_at(&[0xEE; 100], 100 * 4096 + 7).unwrap();
    f.sync_all().unwrap();
    let out = c.adm(0, &["verify", "www"]).unwrap();
    assert!(out.contains("1 block(s) out of sync"), "{out}");
    assert!(c.log(0, "replicatord").contains("Out of sync"));
    c.adm(1, &["invalidate", "www"]).unwrap();
    c.wait_for(Duration::from_secs(5), || {
        Ok(c.status_json(1)?[0]["disk-state"] != "UpToDate"
            || num(&c.status_json(1)?[0]["resync-received-bytes"]) > 0)
    })
    .unwrap();
    c.adm(1, &["wait-sync", "www", "--timeout-s", "90"])
        .unwrap();
    c.adm(0, &["wait-sync", "www", "--timeout-s", "90"])
        .unwrap();
    assert_identical(&c);
    let again = c.adm(0, &["verify", "www"]).unwrap();
    assert!(again.contains("0 block(s) out of sync"), "{again}");
    // invalidate-remote with verify's findings moves only the bad block.
    f.write_all_at(&[0xAB; 10], 200 * 4096).unwrap();
    let out = c.adm(0, &["verify", "www"]).unwrap();
    assert!(out.contains("1 block(s) out of sync"), "{out}");
    let before = num(&c.status_json(1).unwrap()[0]["resync-received-bytes"]);
    c.adm(0, &["invalidate-remote", "www"]).unwrap();
    c.wait_for(Duration::from_secs(30), || {
        Ok(num(&c.status_json(1)?[0]["resync-received-bytes"]) > before
            && c.status_json(0)?[0]["connections"][0]["replication-state"] == "Established")
    })
    .unwrap();
    assert_eq!(
        num(&c.status_json(1).unwrap()[0]["resync-received-bytes"]) - before,
        4096
    );
    assert_identical(&c);
}

fn split(c: &mut Cluster, n1_blocks: u64, n2_blocks: u64) {
    c.net.cut(1).unwrap();
    wait_state(c, 0, "Connecting");
    wait_state(c, 1, "Connecting");
    scatter(c, 0, n1_blocks, 21);
    scatter(c, 1, n2_blocks, 22);
}

fn assert_has_n1_writes(c: &Cluster, count: u64) {
    assert_has_writes(c, 21, count, "n1's write missing on n2");
}

/// Every node serves the `count` blocks `scatter(.., seed)` wrote (read through n2).
fn assert_has_writes(c: &Cluster, seed: u64, count: u64, what: &str) {
    let mut client = NbdClient::connect_unix(&c.nbd_socket(1, "www"), "www").unwrap();
    for i in 0..count {
        let block = (i * 97 + seed * 13) % (VOLUME_BYTES / BLOCK_BYTES as u64);
        let mut buf = vec![0u8; BLOCK_BYTES];
        client
            .read_at(&mut buf, block * BLOCK_BYTES as u64)
            .unwrap();
        assert_eq!(buf, block_data(block, seed * 1000 + i), "{what}");
    }
}

#[test]
fn after_sb_policies_resolve_split_brain_automatically_and_call_the_handler() {
    // 1pri: discard-secondary.
    let marker = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "after-sb-0pri = \"discard-least-changes\"\nafter-sb-1pri = \"discard-secondary\"\nsplit-brain-handler = \"echo $TANDEM_RESOURCE $TANDEM_PEER >> {}\"\n",
        marker.path().display()
    );
    let spec = tandem_tests::ResourceSpec {
        extra,
        ..Default::default()
    };
    let mut c = Cluster::builder()
        .nodes(2)
        .resource(spec.clone())
        .start()
        .unwrap();
    c.bring_up_fresh("www").unwrap();
    c.adm(1, &["primary", "www"]).unwrap();
    split(&mut c, 5, 3);
    c.adm(1, &["secondary", "www"]).unwrap();
    c.net.heal(1).unwrap();
    c.wait_sync_all("www", 90).unwrap();
    assert_identical(&c);
    assert_has_n1_writes(&c, 5);
    assert!(c
        .log(1, "replicatord")
        .contains("our changes are discarded"));
    c.wait_for(Duration::from_secs(5), || {
        Ok(std::fs::read_to_string(marker.path())?.contains("www"))
    })
    .unwrap();
    drop(c);

    // 0pri: discard-least-changes (n2 changed less).
    let mut c = Cluster::builder().nodes(2).resource(spec).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    c.adm(1, &["primary", "www"]).unwrap();
    split(&mut c, 6, 2);
    c.adm(0, &["secondary", "www"]).unwrap();
    c.adm(1, &["secondary", "www"]).unwrap();
    c.net.heal(1).unwrap();
    c.wait_sync_all("www", 90).unwrap();
    assert_identical(&c);
    assert_has_n1_writes(&c, 6);
    assert!(c.log(0, "replicatord").contains("discard-least-changes"));
}

/// n1 is the only Primary; the link goes; n2 is promoted during the split and changes
/// more than n1; both are demoted and the link heals. Returns the healed cluster.
fn split_with_younger_primary_on_n2(policy: &str) -> Cluster {
    let spec = tandem_tests::ResourceSpec {
        extra: format!("after-sb-0pri = \"{policy}\"\n"),
        ..Default::default()
    };
    let mut c = Cluster::builder().nodes(2).resource(spec).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    c.net.cut(1).unwrap();
    wait_state(&c, 0, "Connecting");
    wait_state(&c, 1, "Connecting");
    scatter(&c, 0, 2, 21);
    c.adm(1, &["primary", "www"]).unwrap();
    scatter(&c, 1, 6, 22);
    c.adm(0, &["secondary", "www"]).unwrap();
    c.adm(1, &["secondary", "www"]).unwrap();
    c.net.heal(1).unwrap();
    c.wait_sync_all("www", 90).unwrap();
    assert_identical(&c);
    c
}

#[test]
fn discard_younger_and_older_primary_tell_apart_who_was_primary_before_the_split() {
    // discard-least-changes would keep n2 (6 blocks against 2): the policy must win.
    let c = split_with_younger_primary_on_n2("discard-younger-primary");
    assert_has_writes(&c, 21, 2, "the older Primary's (n1's) write was discarded");
    let log = c.log(0, "replicatord") + &c.log(1, "replicatord");
    assert!(log.contains("rule=discard-younger-primary"), "{log}");
    assert!(!log.contains("undecided"), "{log}");
    assert!(c
        .log(1, "replicatord")
        .contains("our changes are discarded"));
    drop(c);

    let c = split_with_younger_primary_on_n2("discard-older-primary");
    assert_has_writes(
        &c,
        22,
        6,
        "the younger Primary's (n2's) write was discarded",
    );
    assert!(c
        .log(0, "replicatord")
        .contains("our changes are discarded"));
}

#[test]
fn crashed_primary_without_survivor_writes_resyncs_only_its_hot_extents() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    scatter(&c, 0, 16, 30);
    // Writes into one extent, then kill -9 mid-stream.
    let sock = c.nbd_socket(0, "www");
    let writer = std::thread::spawn(move || {
        let mut client = NbdClient::connect_unix(&sock, "www").unwrap();
        for generation in 1.. {
            let block = 2048 + generation % 512; // 8 MiB .. 10 MiB: extent 2
            if client
                .write_at(
                    &block_data(block, generation),
                    block * BLOCK_BYTES as u64,
                    false,
                )
                .is_err()
            {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    c.kill9(0);
    writer.join().unwrap();
    c.start_replicator(0).unwrap();
    c.adm(0, &["up", "www"]).unwrap();
    c.wait_sync_all("www", 90).unwrap();
    assert_identical(&c);
    let got = num(&c.status_json(0).unwrap()[0]["resync-received-bytes"]);
    // Hot extents since promotion: the scattered writes (extents 0 and 1) and the stream
    // (extent 2); nothing else of the 32 MiB volume moves.
    assert!(
        got > 0 && got <= 3 * (4 << 20),
        "crashed Primary resynced {got} bytes, expected at most its three hot extents"
    );
    // Either rule takes the survivor's copy of the hot extents: `local-crashed-primary`,
    // or `target-use-bitmap` when the survivor also marked the writes the dead Primary
    // had not confirmed (peer acks).
    let log = c.log(0, "replicatord");
    assert!(
        log.contains("rule=local-crashed-primary") || log.contains("rule=target-use-bitmap"),
        "{log}"
    );
}

#[test]
fn corrupt_metadata_too_small_disk_and_foreign_disk_are_refused_clearly() {
    use std::os::unix::fs::FileExt;
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    for i in 0..2 {
        c.adm(i, &["create-md", "www"]).unwrap();
    }
    c.start_replicator(0).unwrap();
    // Both metadata slots of n1 corrupted: `up` refuses with a clear message, no panic.
    let disk = c.disk_path(0, "www");
    let len = std::fs::metadata(&disk).unwrap().len();
    let out = c.adm(0, &["dump-md", "www"]).unwrap();
    let md_offset: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("md-offset "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("dump-md prints md-offset");
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&[0x5A; 64], md_offset + 100).unwrap();
    f.write_all_at(&[0x5A; 64], md_offset + 4096 + 100).unwrap();
    let out = c.tandemadm(0, &["up", "www"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt"), "{err}");
    assert!(c.alive(0, "replicatord"), "daemon died on corrupt metadata");
    // A disk shrunk behind our back.
    c.adm(1, &["create-md", "--force", "www"]).unwrap();
    let disk1 = c.disk_path(1, "www");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk1)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = c.tandemadm(1, &["dump-md", "www"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no Tandem metadata") || err.contains("too small"),
        "{err}"
    );
    // n2's disk configured for n1: metadata of another node is refused.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk1)
        .unwrap()
        .set_len(len)
        .unwrap();
    c.adm(1, &["create-md", "--force", "www"]).unwrap();
    std::fs::copy(&disk1, &disk).unwrap();
    let out = c.tandemadm(0, &["up", "www"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node id 2"), "{err}");
    assert!(c.alive(0, "replicatord"));
    assert!(!c.log(0, "replicatord").contains("panicked"));
}

#[test]
fn disk_failure_detaches_and_io_continues_through_the_peer_or_passes_on() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    scatter(&c, 0, 12, 40);
    c.adm(0, &["inject-fault", "www", "--disk-eio"]).unwrap();
    // Reads and writes through n1 keep working, served by n2.
    let mut client = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
    let block = (3 * 97 + 40 * 13) % (VOLUME_BYTES / BLOCK_BYTES as u64);
    let mut buf = vec![0u8; BLOCK_BYTES];
    client
        .read_at(&mut buf, block * BLOCK_BYTES as u64)
        .unwrap();
    assert_eq!(buf, block_data(block, 40003));
    client
        .write_at(&block_data(7, 777), 7 * BLOCK_BYTES as u64, false)
        .unwrap();
    client.flush().unwrap();
    let mut on_n2 = NbdClient::connect_unix(&c.nbd_socket(1, "www"), "www").unwrap();
    on_n2.read_at(&mut buf, 7 * BLOCK_BYTES as u64).unwrap();
    assert_eq!(buf, block_data(7, 777));
    assert_eq!(c.status_json(0).unwrap()[0]["disk-state"], "Diskless");
    assert_eq!(
        c.status_json(1).unwrap()[0]["connections"][0]["peer-disk-state"],
        "Diskless"
    );
    assert!(c.log(0, "replicatord").contains("detaching it"));
    drop(c);

    // pass-on: the application sees EIO.
    let mut c = Cluster::builder()
        .nodes(2)
        .resource(tandem_tests::ResourceSpec {
            extra: "on-io-error = \"pass-on\"\n".into(),
            ..Default::default()
        })
        .start()
        .unwrap();
    c.bring_up_fresh("www").unwrap();
    c.adm(0, &["inject-fault", "www", "--disk-eio"]).unwrap();
    let mut client = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
    let err = client.write_at(&block_data(1, 1), 4096, false).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert_eq!(c.status_json(0).unwrap()[0]["disk-state"], "Failed");
}

/// Three nodes; n3 is cut from the Primary n1 for good and catches up through n2 alone
/// while n1 keeps writing. The join is confirmed by n1 (`Topology`), which mints a new
/// generation before its next write, so n3 never claims n1's generation without n1's
/// writes (formerly gap (c) of docs/SEMANTICS.md). After the heal every copy holds every
/// acknowledged write, and nothing needed a full sync.
#[test]
fn a_node_cut_from_the_primary_catches_up_through_a_secondary_and_loses_nothing() {
    let mut c = Cluster::builder().nodes(3).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    scatter(&c, 0, 32, 1);
    let received_before = num(&c.status_json(2).unwrap()[0]["resync-received-bytes"]);
    let mints = |c: &Cluster| {
        c.log(0, "replicatord")
            .matches("new current generation")
            .count()
    };
    let mints_before = mints(&c);
    // n3 alone, then back with n2 only.
    c.net.cut_link(0, 2).unwrap();
    c.net.cut_link(1, 2).unwrap();
    c.wait_for(Duration::from_secs(30), || {
        let st = c.status_json(2).unwrap();
        Ok(st[0]["connections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["connection-state"] != "Connected"))
    })
    .unwrap();
    scatter(&c, 0, 40, 31);
    assert_eq!(mints(&c), mints_before + 1, "n1 mints when n3 goes");
    // n3 rejoins through n2 while n1 keeps writing: the resync's late passes and the
    // join confirmation run against live writes.
    c.net.heal_link(1, 2).unwrap();
    let writer = {
        let sock = c.nbd_socket(0, "www");
        std::thread::spawn(move || {
            let mut client = NbdClient::connect_unix(&sock, "www").unwrap();
            for i in 0..400u64 {
                let block = (i * 31 + 7) % (VOLUME_BYTES / BLOCK_BYTES as u64);
                client
                    .write_at(
                        &block_data(block, 32_000 + i),
                        block * BLOCK_BYTES as u64,
                        false,
                    )
                    .unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            client.flush().unwrap();
        })
    };
    c.wait_for(Duration::from_secs(60), || {
        let st = c.status_json(2).unwrap();
        Ok(st[0]["disk-state"] == "UpToDate")
    })
    .unwrap_or_else(|e| panic!("n3 never became UpToDate through n2: {e}"));
    writer.join().unwrap();
    scatter(&c, 0, 40, 33);
    assert!(
        mints(&c) >= mints_before + 2,
        "n1 kept writing in the generation n3 joined through n2 without minting"
    );
    c.net.heal_link(0, 2).unwrap();
    c.wait_connected("www").unwrap();
    c.wait_sync_all("www", 60).unwrap();
    assert_identical(&c);
    // The last write to each block, in order: round 31, the live writer, round 33.
    let blocks = VOLUME_BYTES / BLOCK_BYTES as u64;
    let mut want = std::collections::BTreeMap::new();
    for i in 0..40u64 {
        want.insert(
            (i * 97 + 31 * 13) % blocks,
            block_data((i * 97 + 31 * 13) % blocks, 31_000 + i),
        );
    }
    for i in 0..400u64 {
        want.insert(
            (i * 31 + 7) % blocks,
            block_data((i * 31 + 7) % blocks, 32_000 + i),
        );
    }
    for i in 0..40u64 {
        want.insert(
            (i * 97 + 33 * 13) % blocks,
            block_data((i * 97 + 33 * 13) % blocks, 33_000 + i),
        );
    }
    let mut client = NbdClient::connect_unix(&c.nbd_socket(2, "www"), "www").unwrap();
    for (block, data) in &want {
        let mut buf = vec![0u8; BLOCK_BYTES];
        client
            .read_at(&mut buf, block * BLOCK_BYTES as u64)
            .unwrap();
        assert!(
            buf == *data,
            "n3 lacks the Primary's acknowledged write to block {block}"
        );
    }
    let moved = num(&c.status_json(2).unwrap()[0]["resync-received-bytes"]) - received_before;
    assert!(
        moved < VOLUME_BYTES / 4,
        "n3 received {moved} bytes: a full sync where a bitmap resync was due\n{}\n{}\n{}",
        c.log(0, "replicatord"),
        c.log(1, "replicatord"),
        c.log(2, "replicatord")
    );
}

/// Three nodes; the link n1–n3 is cut under a stream of writes, so n1's next write reaches
/// n2 but never n3, and n1 is killed before it gives up on n3. That write was never
/// acknowledged, but n2 and n3 are left at the same generation with different data. With
/// peer acks n2 knows the write was unconfirmed and, once n1 is gone, marks it for n3
/// (and n1) and resyncs it: after the restart all three copies are identical
/// (gap (b) of docs/SEMANTICS.md; mutation-checked: without the marking n3 differs).
#[test]
fn a_primary_killed_with_a_write_on_one_secondary_only_leaves_identical_copies() {
    let mut c = Cluster::builder().nodes(3).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    scatter(&c, 0, 16, 40);
    let sock = c.nbd_socket(0, "www");
    let writer = std::thread::spawn(move || {
        let mut client = NbdClient::connect_unix(&sock, "www").unwrap();
        let mut acked = 0u64;
        for i in 0..100_000u64 {
            let block = i % 256;
            if client
                .write_at(
                    &block_data(block, 41_000 + i),
                    block * BLOCK_BYTES as u64,
                    false,
                )
                .is_err()
            {
                break;
            }
            acked = i;
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(300));
    c.net.cut_link(0, 2).unwrap();
    // n1's current write now waits for n3's ack (up to the 5 s peer timeout).
    std::thread::sleep(Duration::from_millis(700));
    c.kill9(0);
    let acked = writer.join().unwrap();
    assert!(acked > 0, "the writer never got going");
    c.net.heal_link(0, 2).unwrap();
    c.start_replicator(0).unwrap();
    c.adm(0, &["up", "www"]).unwrap();
    c.wait_connected("www").unwrap();
    c.wait_sync_all("www", 60).unwrap();
    assert!(
        c.log(1, "replicatord")
            .contains("writer gone before confirming"),
        "n2 never noticed an unconfirmed write"
    );
    assert_identical(&c);
}

/// Two nodes in sync, n1 Primary, resync capped at 4 MiB/s (a full resync of the 32 MiB
/// volume takes about 8 s: time to act while it runs).
fn two_nodes_resyncing_at_4_mib_s() -> Cluster {
    let mut c = Cluster::builder()
        .nodes(2)
        .resource(tandem_tests::cluster::ResourceSpec {
            extra: "resync-rate = \"4MiB\"\n".into(),
            ..Default::default()
        })
        .start()
        .unwrap();
    c.bring_up_fresh("www").unwrap();
    c
}

/// DRBD keeps a Primary serving while it resyncs as SyncTarget; so do we. n1 is
/// invalidated while Primary: its whole volume comes back from n2 at 4 MiB/s while an
/// application reads and writes through n1 — whole blocks, pieces of blocks not yet
/// resynced, zeroed ranges — and every read matches what was acknowledged. Afterwards
/// both copies equal the model.
#[test]
fn a_primary_keeps_reading_and_writing_while_it_resyncs_as_synctarget() {
    let c = two_nodes_resyncing_at_4_mib_s();
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut client = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut write = |client: &mut NbdClient, model: &mut Vec<u8>, offset: u64, len: usize| {
        let data: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        client.write_at(&data, offset, false).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    };
    // Content everywhere, so a block read from the wrong copy shows.
    for mib in 0..VOLUME_BYTES >> 20 {
        write(&mut client, &mut model, mib << 20, 1 << 20);
    }
    client.flush().unwrap();
    // Invalidated while writes and flushes are in flight: none of them may fail (both
    // wait for the source's SyncStart rather than finding the disk Inconsistent).
    std::thread::scope(|s| {
        let c = &c;
        let inv = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            c.adm(0, &["invalidate", "www"]).unwrap();
        });
        let mut k = 0u64;
        while !inv.is_finished() {
            let block = (k * 37) % (VOLUME_BYTES / BLOCK_BYTES as u64);
            write(
                &mut client,
                &mut model,
                block * BLOCK_BYTES as u64,
                BLOCK_BYTES,
            );
            if k % 2 == 1 {
                client.flush().unwrap();
            }
            k += 1;
        }
    });
    let repl = |c: &Cluster| {
        c.status_json(0).unwrap()[0]["connections"][0]["replication-state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut ops_as_target = 0;
    let mut rng2 = rand::rngs::StdRng::seed_from_u64(8);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state = repl(&c);
        if state == "Established" && c.status_json(0).unwrap()[0]["disk-state"] == "UpToDate" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "resync never finished"
        );
        let target = state == "SyncTarget";
        // Half the operations just ahead of the resync, where its data is in flight.
        let frontier = num(&c.status_json(0).unwrap()[0]["resync-received-bytes"]);
        let blocks = VOLUME_BYTES / BLOCK_BYTES as u64;
        for _ in 0..20 {
            let block = if rng2.gen_bool(0.5) {
                (frontier / BLOCK_BYTES as u64 + rng2.gen_range(0..512)).min(blocks - 4)
            } else {
                rng2.gen_range(0..blocks - 4)
            };
            let base = block * BLOCK_BYTES as u64;
            match rng2.gen_range(0..5) {
                0 => write(
                    &mut client,
                    &mut model,
                    base,
                    BLOCK_BYTES * rng2.gen_range(1..4),
                ),
                1 => {
                    // A piece of a block (the rest must still come from n2).
                    let at = base + rng2.gen_range(0..3584);
                    write(&mut client, &mut model, at, rng2.gen_range(1..512));
                }
                2 => {
                    client.write_zeroes(base + 512, 1024).unwrap();
                    model[base as usize + 512..base as usize + 1536].fill(0);
                }
                _ => {
                    let len = BLOCK_BYTES * rng2.gen_range(1..8);
                    let at = base.min(VOLUME_BYTES - len as u64);
                    let mut buf = vec![0u8; len];
                    client.read_at(&mut buf, at).unwrap();
                    assert!(
                        buf == model[at as usize..at as usize + len],
                        "read of {at}+{len} during the resync ({state}) differs from what was written"
                    );
                }
            }
            if target {
                ops_as_target += 1;
            }
        }
    }
    assert!(
        ops_as_target >= 100,
        "only {ops_as_target} operations ran while n1 was SyncTarget"
    );
    client.flush().unwrap();
    c.adm(1, &["wait-sync", "www", "--timeout-s", "30"])
        .unwrap();
    let mut all = vec![0u8; VOLUME_BYTES as usize];
    for mib in 0..VOLUME_BYTES >> 20 {
        client
            .read_at(
                &mut all[(mib << 20) as usize..((mib + 1) << 20) as usize],
                mib << 20,
            )
            .unwrap();
    }
    assert!(
        all == model,
        "n1 reads differ from the model after the resync"
    );
    assert_identical(&c);
    let disk = std::fs::read(c.disk_path(1, "www")).unwrap();
    assert!(
        disk[..VOLUME_BYTES as usize] == model[..],
        "n2's copy differs from the model"
    );
}

/// A Secondary that is SyncTarget can be promoted while its source streams (DRBD allows
/// it: I/O goes through the source), and what it writes then is on both copies after the
/// resync. While it only waits for its source, `primary` is refused with a retry hint.
#[test]
fn a_synctarget_can_be_promoted_while_its_source_is_connected() {
    let c = two_nodes_resyncing_at_4_mib_s();
    scatter(&c, 0, 64, 5);
    c.adm(1, &["invalidate", "www"]).unwrap();
    c.wait_for(Duration::from_secs(10), || {
        Ok(c.status_json(1)?[0]["connections"][0]["replication-state"] == "SyncTarget")
    })
    .unwrap();
    c.adm(1, &["primary", "www"])
        .expect("a SyncTarget with its source connected may be promoted");
    assert_eq!(c.status_json(1).unwrap()[0]["role"], "Primary");
    assert_eq!(c.status_json(1).unwrap()[0]["disk-state"], "Inconsistent");
    // Writes through n2 while it is still SyncTarget, then read back there.
    scatter(&c, 1, 32, 6);
    assert_has_writes(&c, 6, 32, "n2's write read back on n2 while SyncTarget");
    assert_eq!(
        c.status_json(1).unwrap()[0]["connections"][0]["replication-state"],
        "SyncTarget",
        "the resync ended before the writes: the test proves nothing"
    );
    c.wait_sync_all("www", 60).unwrap();
    assert_identical(&c);
}

/// A full resync cut halfway resumes where it stopped, even when the source then writes
/// without the target: before, those writes gave the target a bitmap generation equal to
/// its current one, and the reconnect chose a bitmap resync of only those writes, so the
/// invalidated node became UpToDate with half its volume never received.
#[test]
fn an_interrupted_full_resync_resumes_and_leaves_identical_copies() {
    let c = two_nodes_resyncing_at_4_mib_s();
    // Different content everywhere on n1 than the zeroes n2 would keep.
    let mut client = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
    let mib: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for m in 0..VOLUME_BYTES >> 20 {
        client.write_at(&mib, m << 20, false).unwrap();
    }
    client.flush().unwrap();
    // n2's copy goes bad behind its back (what `invalidate` is for): only the resync can
    // make it equal again, block by block.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.disk_path(1, "www"))
            .unwrap();
        f.write_all_at(&vec![0xEE; VOLUME_BYTES as usize], 0)
            .unwrap();
        f.sync_all().unwrap();
    }
    c.adm(1, &["invalidate", "www"]).unwrap();
    c.wait_for(Duration::from_secs(10), || {
        Ok(num(&c.status_json(1)?[0]["resync-received-bytes"]) >= 4 << 20)
    })
    .unwrap();
    c.net.cut_link(0, 1).unwrap();
    c.wait_for(Duration::from_secs(20), || {
        Ok(conn_state(&c, 0) != "Connected")
    })
    .unwrap();
    let received = num(&c.status_json(1).unwrap()[0]["resync-received-bytes"]);
    assert!(
        received < VOLUME_BYTES / 2,
        "the resync was not cut halfway ({received} bytes)"
    );
    // n1 writes without n2: tracked for it.
    scatter(&c, 0, 8, 31);
    c.net.heal_link(0, 1).unwrap();
    c.wait_sync_all("www", 60).unwrap();
    assert_identical(&c);
}

/// The connection of `node` to the peer with node id `peer_id` (1-based), from status.
fn peer_conn(c: &Cluster, node: usize, peer_id: u64) -> serde_json::Value {
    let st = c.status_json(node).unwrap();
    st[0]["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer-node-id"].as_u64() == Some(peer_id))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// An invalidated node must not take its data from a copy older than its own. n1 writes
/// while its link to n2 is cut; n3 gets the writes and n1's new generation, and tracks
/// the writes for n2 (Secondaries do not relay). With n1 gone, `invalidate` on n3 leaves
/// n2 as the only source. Before session 17, n2 full-resynced n3 (`peer-without-data`):
/// n3 became UpToDate without n1's acknowledged writes, which then existed only on the
/// dead n1 — and n3 marked them for n1, so n1's copy would have been overwritten too. Now
/// n3 stays Inconsistent until a source at its generation is back: n1 restarts, resyncs
/// n3 and n2, and every copy has every acknowledged write.
#[test]
fn an_invalidated_node_never_takes_a_copy_that_lacks_writes_it_tracked() {
    let mut c = Cluster::builder().nodes(3).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    c.net.cut_link(0, 1).unwrap();
    c.wait_for(Duration::from_secs(20), || {
        Ok(peer_conn(&c, 0, 2)["connection-state"] != "Connected"
            && peer_conn(&c, 1, 1)["connection-state"] != "Connected")
    })
    .unwrap();
    let mut client = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
    // The first write mints; n3's new generation makes it resync n2 once.
    client
        .write_at(&block_data(10, 1), 10 * BLOCK_BYTES as u64, false)
        .unwrap();
    // More writes: n3 tracks them all for n2 (it does not relay them).
    let mut log = WriteLog::default();
    for block in 20..30u64 {
        log.begin(block, 2);
        client
            .write_at(&block_data(block, 2), block * BLOCK_BYTES as u64, false)
            .unwrap();
        log.ack(block, 2);
    }
    client.flush().unwrap();
    drop(client);
    c.kill9(0);
    c.adm(2, &["invalidate", "www"]).unwrap();
    // Give n2 every chance to (wrongly) resync n3.
    std::thread::sleep(Duration::from_secs(3));
    let st = c.status_json(2).unwrap();
    let disk = st[0]["disk-state"].as_str().unwrap().to_string();
    if disk == "UpToDate" {
        let image = std::fs::read(c.disk_path(2, "www")).unwrap();
        if let Err(e) = log.check_image(&image, 20..30) {
            panic!("n3 became UpToDate from n2's copy without n1's acknowledged writes: {e}");
        }
    }
    assert_eq!(
        disk, "Inconsistent",
        "n3 after invalidate with only n2 connected"
    );
    // The writer comes back (crashed Primary, its data intact) and the link heals.
    c.net.heal_link(0, 1).unwrap();
    c.start_replicator(0).unwrap();
    c.adm(0, &["up", "www"]).unwrap();
    c.wait_sync_all("www", 60).unwrap();
    c.check_acknowledged("www", &log, 20..30);
    assert_identical(&c);
}
