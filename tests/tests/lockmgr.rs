//! Lock manager as real processes in network namespaces (the harness of the replicator
//! scenarios): leader kill -9 under use, re-election, clients continue, the killed node
//! restarts with its data dir and catches up.

use std::time::{Duration, Instant};

use tandem_tests::Cluster;

fn leader_seen_by(c: &Cluster, node: usize) -> Option<u64> {
    c.lockctl_status(node).and_then(|s| s["leader"].as_u64())
}

#[test]
fn lock_manager_in_namespaces_survives_leader_kill9_and_the_node_catches_up() {
    let mut c = Cluster::builder().nodes(3).start().unwrap();
    for i in 0..3 {
        c.start_lockd(i).unwrap();
    }
    let mut leader = 0u64;
    c.wait_for(Duration::from_secs(30), || {
        let seen: Vec<Option<u64>> = (0..3).map(|i| leader_seen_by(&c, i)).collect();
        leader = seen[0].unwrap_or(0);
        Ok(leader != 0 && seen.iter().all(|l| *l == Some(leader)))
    })
    .unwrap_or_else(|e| panic!("no common leader: {e}\n{}", c.log(0, "lockd")));
    // Locks work from every node.
    for i in 0..3 {
        let out = c
            .lockctl(i, &["lock", "test:fs", "res-a", "--run", "true"])
            .unwrap();
        assert!(
            out.status.success(),
            "lock on n{}: {}",
            i + 1,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // kill -9 the leader; the survivors elect a new one and keep granting.
    let old = (leader - 1) as usize;
    c.kill9(old);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let start = Instant::now();
    c.wait_for(Duration::from_secs(30), || {
        let seen: Vec<Option<u64>> = survivors.iter().map(|&i| leader_seen_by(&c, i)).collect();
        Ok(seen.iter().all(|l| l.is_some_and(|l| l != leader)) && seen[0] == seen[1])
    })
    .unwrap();
    eprintln!("new leader after {:?}", start.elapsed());
    for &i in &survivors {
        let out = c
            .lockctl(i, &["lock", "test:fs", "res-b", "--run", "true"])
            .unwrap();
        assert!(
            out.status.success(),
            "lock on n{} after the kill: {}",
            i + 1,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The killed node restarts with its data directory and catches up.
    c.start_lockd(old).unwrap();
    let target = c.lockctl_status(survivors[0]).unwrap()["commit_index"]
        .as_u64()
        .unwrap_or(0);
    assert!(target > 0, "survivor reports no commit index");
    c.wait_for(Duration::from_secs(30), || {
        let s = c.lockctl_status(old);
        Ok(s.is_some_and(|s| {
            s["leader"].as_u64().is_some() && s["applied_index"].as_u64().unwrap_or(0) >= target
        }))
    })
    .unwrap_or_else(|e| {
        panic!(
            "restarted node did not catch up: {e}\n{}",
            c.log(old, "lockd")
        )
    });
    let out = c
        .lockctl(old, &["lock", "test:fs", "res-c", "--run", "true"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c.log(0, "lockd").contains("panicked"));
}
