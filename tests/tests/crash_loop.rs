//! Crash loop: kill -9 the writing Primary's daemon again and again under load, restart
//! it, resync, and check the acknowledged-write oracle on every copy each time.
//! `TANDEM_CRASH_LOOPS` sets the iterations (default 10 in the test suite; issue 9's
//! drill runs 100).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tandem_replicator::nbd::client::NbdClient;
use tandem_tests::oracle::{block_data, WriteLog, BLOCK_BYTES};
use tandem_tests::Cluster;

#[test]
fn kill9_loop_of_the_primary_never_loses_an_acknowledged_write() {
    let loops: usize = std::env::var("TANDEM_CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    let log = Arc::new(Mutex::new(WriteLog::default()));
    let blocks = 512u64;
    let mut generation = 0u64;
    for round in 0..loops {
        // Alternate which node is Primary, so both sides crash and both resync.
        let primary = round % 2;
        c.adm(primary, &["primary", "www"]).unwrap();
        let sock = c.nbd_socket(primary, "www");
        let log2 = log.clone();
        let start_gen = generation;
        let writer = std::thread::spawn(move || {
            let mut client = NbdClient::connect_unix(&sock, "www").unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(start_gen);
            let mut g = start_gen;
            loop {
                g += 1;
                let block = rng.gen_range(0..blocks);
                log2.lock().unwrap().begin(block, g);
                if client
                    .write_at(&block_data(block, g), block * BLOCK_BYTES as u64, false)
                    .is_err()
                {
                    return g;
                }
                log2.lock().unwrap().ack(block, g);
            }
        });
        std::thread::sleep(Duration::from_millis(300 + (round as u64 % 4) * 100));
        c.kill9(primary);
        generation = writer.join().unwrap() + 1000;
        // Restart the killed node; both resync; the oracle holds on both copies.
        c.start_replicator(primary).unwrap();
        c.adm(primary, &["up", "www"]).unwrap();
        c.wait_sync_all("www", 120).unwrap();
        let snapshot = log.lock().unwrap().clone();
        for i in 0..2 {
            let disk = std::fs::read(c.disk_path(i, "www")).unwrap();
            for block in 0..blocks {
                let at = block as usize * BLOCK_BYTES;
                if let Err(e) = snapshot.check(block, &disk[at..at + BLOCK_BYTES]) {
                    panic!("round {round}, n{}: {e}", i + 1);
                }
            }
        }
        let other = 1 - primary;
        if c.status_json(other).unwrap()[0]["role"] == "Primary" {
            c.adm(other, &["secondary", "www"]).unwrap();
        }
        // In-flight writes of the killed round are settled now: whatever the disks agree on
        // is the new acknowledged state.
        let disk = std::fs::read(c.disk_path(0, "www")).unwrap();
        let mut settled = WriteLog::default();
        for block in 0..blocks {
            let at = block as usize * BLOCK_BYTES;
            if let Some(g) =
                tandem_tests::oracle::block_generation(block, &disk[at..at + BLOCK_BYTES])
            {
                if g > 0 {
                    settled.ack(block, g);
                }
            }
        }
        *log.lock().unwrap() = settled;
    }
}
