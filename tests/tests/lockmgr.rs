//! Lock manager as real processes in network namespaces (the harness of the replicator
//! scenarios): leader kill -9 under use, re-election, clients continue, the killed node
//! restarts with its data dir and catches up.

use std::process::Command;
use std::time::{Duration, Instant};

use tandem_tests::{bin, Cluster};

fn lockctl(c: &Cluster, node: usize, args: &[&str]) -> std::process::Output {
    Command::new(bin("tandem-lockctl"))
        .arg("--config")
        .arg(c.config_path(node))
        .arg("--node")
        .arg(c.node_name(node))
        .args(args)
        .output()
        .expect("run tandem-lockctl")
}

fn status(c: &Cluster, node: usize) -> Option<serde_json::Value> {
    let out = lockctl(c, node, &["status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn leader_seen_by(c: &Cluster, node: usize) -> Option<u64> {
    status(c, node).and_then(|s| s["leader"].as_u64())
}

fn start_lockd(c: &mut Cluster, node: usize) {
    let cfg = c.config_path(node).display().to_string();
    let name = c.node_name(node);
    c.spawn(
        node,
        "lockd",
        &bin("tandem-lockd"),
        &["--config", &cfg, "--node", &name],
    )
    .unwrap();
}

#[test]
fn lock_manager_in_namespaces_survives_leader_kill9_and_the_node_catches_up() {
    let mut c = Cluster::builder().nodes(3).start().unwrap();
    for i in 0..3 {
        start_lockd(&mut c, i);
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
        let out = lockctl(&c, i, &["lock", "test:fs", "res-a", "--run", "true"]);
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
        let out = lockctl(&c, i, &["lock", "test:fs", "res-b", "--run", "true"]);
        assert!(
            out.status.success(),
            "lock on n{} after the kill: {}",
            i + 1,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The killed node restarts with its data directory and catches up.
    start_lockd(&mut c, old);
    let target = status(&c, survivors[0]).unwrap()["commit_index"]
        .as_u64()
        .unwrap_or(0);
    assert!(target > 0, "survivor reports no commit index");
    c.wait_for(Duration::from_secs(30), || {
        let s = status(&c, old);
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
    let out = lockctl(&c, old, &["lock", "test:fs", "res-c", "--run", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c.log(0, "lockd").contains("panicked"));
}
