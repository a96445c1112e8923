//! Lock manager as real processes in network namespaces (the harness of the replicator
//! scenarios): leader kill -9 under load (clients on a surviving node keep locking through
//! the re-election), the killed node restarts with its data dir and catches up, and a node
//! whose state directory was wiped rejoins through `member remove` / `member add`.

use std::time::{Duration, Instant};

use tandem_tests::Cluster;

/// Takes and releases `res` through node `node`'s lockd (`lockctl lock --run true`);
/// panics with lockctl's error and `when` otherwise.
fn lock_once(c: &Cluster, node: usize, res: &str, when: &str) {
    let out = c
        .lockctl(node, &["lock", "test:fs", res, "--run", "true"])
        .unwrap();
    assert!(
        out.status.success(),
        "lock on n{} {when}: {}",
        node + 1,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn leader_seen_by(c: &Cluster, node: usize) -> Option<u64> {
    c.lockctl_status(node).and_then(|s| s["leader"].as_u64())
}

#[test]
fn lock_manager_in_namespaces_survives_leader_kill9_and_the_node_catches_up() {
    let mut c = Cluster::builder().nodes(3).start().unwrap();
    for i in 0..3 {
        c.start_lockd(i).unwrap();
    }
    let leader = c.wait_common_leader(&[0, 1, 2], Duration::from_secs(30));
    // Locks work from every node.
    for i in 0..3 {
        lock_once(&c, i, "res-a", "at the start");
    }
    // Load: a client loop on a follower takes and releases locks the whole time.
    let old = (leader - 1) as usize;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let loader = survivors[0];
    let load_script = format!(
        "ok=0; fail=0; end=$(( $(date +%s) + 12 )); i=0; \
         while [ $(date +%s) -lt $end ]; do i=$((i+1)); \
         if timeout 20 '{bin}' --config '{cfg}' --node '{node}' lock test:fs load-$((i % 8)) --run true >/dev/null 2>&1; \
         then ok=$((ok+1)); last=ok; else fail=$((fail+1)); last=fail; fi; done; \
         echo \"ok=$ok fail=$fail last=$last\"",
        bin = tandem_tests::bin("tandem-lockctl").display(),
        cfg = c.config_path(loader).display(),
        node = c.node_name(loader),
    );
    let ns_load = {
        let script = load_script.clone();
        let c_ns = c.node_ns(loader);
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &c_ns, "bash", "-c", &script])
                .output()
                .expect("load loop")
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    // kill -9 the leader; the survivors elect a new one and keep granting.
    c.kill9(old);
    let start = Instant::now();
    c.wait_for(Duration::from_secs(30), || {
        let seen: Vec<Option<u64>> = survivors.iter().map(|&i| leader_seen_by(&c, i)).collect();
        Ok(seen.iter().all(|l| l.is_some_and(|l| l != leader)) && seen[0] == seen[1])
    })
    .unwrap();
    eprintln!("new leader after {:?}", start.elapsed());
    let load = ns_load.join().expect("load thread");
    let report = String::from_utf8_lossy(&load.stdout).trim().to_string();
    eprintln!(
        "client loop on n{} across the leader kill: {report}",
        loader + 1
    );
    let count = |k: &str| -> u64 {
        report
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(count("ok=") >= 10, "the client loop barely ran: {report}");
    assert!(
        report.ends_with("last=ok"),
        "clients did not continue after the re-election: {report}"
    );
    for &i in &survivors {
        lock_once(&c, i, "res-b", "after the kill");
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
    lock_once(&c, old, "res-c", "after its restart");

    // Wipe a node's lock-manager state: it rejoins through member remove / add.
    let wiped = survivors[1];
    let admin = survivors[0];
    c.kill9(wiped);
    std::fs::remove_dir_all(c.dir().join("state").join(c.node_name(wiped)).join("lockd")).unwrap();
    let name = c.node_name(wiped);
    let member = |c: &tandem_tests::Cluster, args: &[&str]| {
        let mut all = vec!["member"];
        all.extend_from_slice(args);
        let out = c.lockctl(admin, &all).unwrap();
        assert!(
            out.status.success(),
            "member {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    member(&c, &["remove", &name]);
    let cfg = c.config_path(wiped).display().to_string();
    c.spawn(
        wiped,
        "lockd",
        &tandem_tests::bin("tandem-lockd"),
        &["--config", &cfg, "--node", &name, "--join"],
    )
    .unwrap();
    member(&c, &["add", "--learner", &name]);
    member(&c, &["add", &name]);
    let target = c.lockctl_status(admin).unwrap()["commit_index"]
        .as_u64()
        .unwrap_or(0);
    c.wait_for(Duration::from_secs(30), || {
        let (Some(s), Some(a)) = (c.lockctl_status(wiped), c.lockctl_status(admin)) else {
            return Ok(false);
        };
        Ok(s["applied_index"].as_u64().unwrap_or(0) >= target
            && s["voters"].as_array().is_some_and(|v| v.len() == 3)
            && s["leader"] == a["leader"]
            && s["term"] == a["term"])
    })
    .unwrap_or_else(|e| {
        panic!(
            "the wiped node did not rejoin: {e}\n{}",
            c.log(wiped, "lockd")
        )
    });
    lock_once(&c, wiped, "res-d", "after rejoining wiped");
    for i in 0..3 {
        assert!(!c.log(i, "lockd").contains("panicked"), "n{}", i + 1);
    }
}
