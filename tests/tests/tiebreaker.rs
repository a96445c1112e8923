//! Diskless tiebreakers with real processes in namespaces: two disk nodes plus one node
//! without a disk, `quorum = majority`, `on-no-quorum = io-error`. The tiebreaker must let
//! the survivor of a disk-node loss keep writing, must never give quorum to a stale node,
//! and after a cut between the disk nodes (both still seeing it) only one side may write.

use std::time::Duration;

use tandem_replicator::nbd::client::NbdClient;
use tandem_tests::oracle::{block_data, BLOCK_BYTES};
use tandem_tests::{file_crc, Cluster, ResourceSpec};

const VOLUME_BYTES: u64 = 32 << 20;
const EIO: i32 = 5;
const TB: usize = 2;

fn start() -> Cluster {
    let mut c = Cluster::builder()
        .nodes(3)
        .resource(ResourceSpec {
            extra: "quorum = \"majority\"\non-no-quorum = \"io-error\"\n".into(),
            diskless: vec![TB],
            ..Default::default()
        })
        .start()
        .unwrap();
    c.bring_up_fresh("www").unwrap();
    c
}

fn write_block(c: &Cluster, node: usize, block: u64, generation: u64) -> std::io::Result<()> {
    let mut client = NbdClient::connect_unix(&c.nbd_socket(node, "www"), "www")?;
    client.write_at(
        &block_data(block, generation),
        block * BLOCK_BYTES as u64,
        false,
    )?;
    client.flush()
}

fn read_block(c: &Cluster, node: usize, block: u64) -> Vec<u8> {
    let mut client = NbdClient::connect_unix(&c.nbd_socket(node, "www"), "www").unwrap();
    let mut buf = vec![0u8; BLOCK_BYTES];
    client
        .read_at(&mut buf, block * BLOCK_BYTES as u64)
        .unwrap();
    buf
}

fn quorum(c: &Cluster, node: usize) -> bool {
    c.status_json(node).unwrap()[0]["quorum"] == true
}

fn connected_to(c: &Cluster, node: usize, peer: &str) -> bool {
    c.status_json(node).unwrap()[0]["connections"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == peer && x["connection-state"] == "Connected")
}

fn wait(c: &Cluster, what: &str, mut f: impl FnMut() -> bool) {
    c.wait_for(Duration::from_secs(30), || Ok(f()))
        .unwrap_or_else(|e| panic!("never: {what}: {e}"));
}

fn assert_disks_identical(c: &Cluster) {
    let a = file_crc(&c.disk_path(0, "www"), 0, VOLUME_BYTES).unwrap();
    let b = file_crc(&c.disk_path(1, "www"), 0, VOLUME_BYTES).unwrap();
    assert_eq!(a, b, "n1 and n2 differ");
}

#[test]
fn tiebreaker_holds_no_data_and_refuses_data_commands() {
    let c = start();
    let st = c.status_json(TB).unwrap()[0].clone();
    assert_eq!(st["disk-state"], "Diskless");
    assert_eq!(st["client"], true);
    assert!(
        !c.nbd_socket(TB, "www").exists(),
        "a tiebreaker exports nothing"
    );
    let n1 = c.status_json(0).unwrap()[0].clone();
    let tb = n1["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "n3")
        .unwrap()
        .clone();
    assert_eq!(tb["peer-client"], true);
    assert_eq!(tb["peer-disk-state"], "Diskless");
    assert_eq!(tb["tiebreaker-vote"], true, "{tb}");
    for cmd in [
        &["primary", "www"][..],
        &["invalidate", "www"],
        &["verify", "www"],
        &["new-current-uuid", "--clear-bitmap", "www"],
    ] {
        let out = c.tandemadm(TB, cmd).unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} succeeded on a tiebreaker");
        assert!(text.contains("diskless tiebreaker"), "{cmd:?}: {text}");
    }
    let out = c.tandemadm(TB, &["create-md", "www"]).unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("diskless tiebreaker"),
        "{text}"
    );
    // Writes go to the disk node only: the tiebreaker receives no data.
    for b in 0..16 {
        write_block(&c, 0, b, 1).unwrap();
    }
    let text = c.adm(TB, &["status", "www"]).unwrap();
    assert!(text.contains("client:yes"), "{text}");
    let st = c.status_json(TB).unwrap()[0].clone();
    assert_eq!(st["resync-received-bytes"], 0);
    assert_eq!(st["written-bytes"], 0);
    // Its own metadata has no bitmap slot for the tiebreaker.
    let md = c.adm(0, &["dump-md", "www"]).unwrap();
    assert!(md.contains("peer 2 ") && !md.contains("peer 3 "), "{md}");
    c.wait_sync_all("www", 30).unwrap();
}

#[test]
fn survivor_keeps_quorum_through_the_tiebreaker_and_a_stale_node_never_gets_it() {
    let mut c = start();
    write_block(&c, 0, 1, 1).unwrap();
    // n2 goes away: n1 + tiebreaker are a majority, writes go on.
    c.net.cut(1).unwrap();
    wait(&c, "n1 sees n2 gone", || !connected_to(&c, 0, "n2"));
    for b in 2..10 {
        write_block(&c, 0, b, 2).unwrap();
    }
    assert!(quorum(&c, 0));
    // Now n1 goes away and the stale n2 comes back to the tiebreaker only: it missed
    // acknowledged writes, so the tiebreaker must not vote for it.
    c.net.cut(0).unwrap();
    c.net.heal(1).unwrap();
    wait(&c, "n2 connected to the tiebreaker", || {
        connected_to(&c, 1, "n3")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!quorum(&c, 1), "stale n2 got quorum from the tiebreaker");
    c.adm(1, &["primary", "www"]).unwrap();
    let err = write_block(&c, 1, 40, 3).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    c.adm(1, &["secondary", "www"]).unwrap();
    // n1 returns: n2 takes what it missed, and every acknowledged write is on both.
    c.net.heal(0).unwrap();
    c.wait_sync_all("www", 90).unwrap();
    assert_disks_identical(&c);
    for b in 2..10 {
        assert_eq!(read_block(&c, 1, b), block_data(b, 2), "block {b} on n2");
    }
    // A restarted tiebreaker learns the generation back once both disk nodes agree.
    c.stop(TB);
    c.start_replicator(TB).unwrap();
    c.adm(TB, &["up", "www"]).unwrap();
    c.wait_connected("www").unwrap();
    wait(&c, "tiebreaker vouches again", || {
        c.status_json(0).unwrap()[0]["connections"][1]["tiebreaker-vote"] == true
    });
}

#[test]
fn after_a_cut_between_the_disk_nodes_only_one_primary_may_write() {
    let c = start();
    c.adm(1, &["primary", "www"]).unwrap();
    write_block(&c, 0, 1, 1).unwrap();
    write_block(&c, 1, 2, 1).unwrap();
    // Both disk nodes still see the tiebreaker, not each other.
    c.net.cut_link(0, 1).unwrap();
    wait(&c, "n1 sees n2 gone", || !connected_to(&c, 0, "n2"));
    wait(&c, "n2 sees n1 gone", || !connected_to(&c, 1, "n1"));
    assert!(connected_to(&c, 0, "n3") && connected_to(&c, 1, "n3"));
    // The first to write wins the tiebreaker; the other fails instead of diverging.
    write_block(&c, 0, 10, 2).unwrap();
    let err = write_block(&c, 1, 11, 2).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    assert!(quorum(&c, 0));
    assert!(!quorum(&c, 1));
    write_block(&c, 0, 12, 2).unwrap();
    // Heal: n2 takes n1's copy; n1's acknowledged writes are everywhere.
    c.adm(1, &["secondary", "www"]).unwrap();
    c.net.heal_link(0, 1).unwrap();
    c.wait_sync_all("www", 90).unwrap();
    assert_disks_identical(&c);
    assert_eq!(read_block(&c, 1, 10), block_data(10, 2));
    assert_eq!(read_block(&c, 1, 12), block_data(12, 2));
}
