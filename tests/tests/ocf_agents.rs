//! The OCF agents outside Pacemaker, against real daemons, for the cases a Pacemaker
//! cluster in the harness cannot easily produce:
//! - `ocf:tandem:fs`: a mount that cannot finish (another node holds the filesystem's
//!   `meta` lock forever) makes start fail within the start timeout Pacemaker passes, and
//!   leaves no mount daemon behind that could mount after Pacemaker has given up;
//! - `ocf:tandem:replicator`: monitor's 7 / 0 / 8 / 9 (9 = Primary without good data:
//!   its disk failed and detached while no UpToDate peer is connected).

use std::path::Path;
use std::time::{Duration, Instant};

use tandem_replicator::nbd::client::NbdClient;
use tandem_tests::fscluster::{FsCluster, RES};
use tandem_tests::{bin, bin_dir, Cluster};

fn agent_path(name: &str) -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ocf-agents/tandem")
        .join(name);
    assert!(
        Path::new("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(),
        "resource-agents is not installed (scripts/install-deps.sh installs it)"
    );
    p
}

fn agent() -> std::path::PathBuf {
    agent_path("fs")
}

/// Runs `ocf:tandem:replicator <action>` for resource www as node `i`; returns its exit code.
fn replicator_agent(c: &Cluster, i: usize, action: &str) -> i32 {
    let script = format!(
        "OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=webdata OCF_RESKEY_resource=www \
         OCF_RESKEY_config='{cfg}' OCF_RESKEY_node='{node}' PATH='{bins}':$PATH \
         '{agent}' {action}",
        cfg = c.config_path(i).display(),
        node = c.node_name(i),
        bins = bin_dir().display(),
        agent = agent_path("replicator").display(),
    );
    c.in_ns(i, &script)
        .expect("run the agent")
        .status
        .code()
        .unwrap_or(-1)
}

#[test]
fn replicator_agent_monitor_reports_7_0_8_and_9() {
    let mut c = Cluster::builder().nodes(2).start().unwrap();
    c.bring_up_fresh("www").unwrap();
    assert_eq!(replicator_agent(&c, 0, "monitor"), 8, "Primary, UpToDate");
    assert_eq!(replicator_agent(&c, 1, "monitor"), 0, "Secondary");
    // Without its peer, n1's disk fails: Primary, Diskless, no UpToDate peer -> 9.
    c.adm(0, &["disconnect", "www"]).unwrap();
    c.adm(0, &["inject-fault", "www", "--disk-eio"]).unwrap();
    let mut client = NbdClient::connect_unix(&c.nbd_socket(0, "www"), "www").unwrap();
    let _ = client.write_at(&[1u8; 4096], 0, true);
    c.wait_for(Duration::from_secs(10), || {
        Ok(c.status_json(0)?[0]["disk-state"] != "UpToDate")
    })
    .unwrap();
    assert_eq!(
        replicator_agent(&c, 0, "monitor"),
        9,
        "Primary without good data: {}",
        c.adm(0, &["status", "www"]).unwrap_or_default()
    );
    // No daemon: not running.
    c.stop(1);
    assert_eq!(replicator_agent(&c, 1, "monitor"), 7, "daemon stopped");
}

#[test]
fn fs_agent_start_gives_up_within_its_timeout_and_kills_the_hung_mount() {
    let mut f = FsCluster::start(2, 0).unwrap();
    // n2 takes `meta` EX and keeps it: n1's mount waits for it forever.
    let cfg = f.c.config_path(1).display().to_string();
    let node2 = f.c.node_name(1);
    f.c.spawn(
        1,
        "holder",
        &bin("tandem-lockctl"),
        &[
            "--config", &cfg, "--node", &node2, "lock", "test:www", "meta", "--run", "sleep", "300",
        ],
    )
    .unwrap();
    f.c.wait_for(Duration::from_secs(20), || {
        let out = f.c.lockctl(1, &["locks", "test:www"])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("meta"))
    })
    .unwrap_or_else(|e| panic!("the holder never got meta: {e}\n{}", f.c.log(1, "holder")));

    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().display().to_string();
    let script = format!(
        "export OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=webfs \
         OCF_RESKEY_device='{uri}' OCF_RESKEY_directory='{dir_s}' \
         OCF_RESKEY_config='{cfg}' OCF_RESKEY_node='{node}' OCF_RESKEY_CRM_meta_timeout=8000 \
         PATH='{bins}':$PATH; \
         unshare --mount --propagation private bash -c '\"{agent}\" start; echo rc=$?; \
         grep -c \" {dir_s} \" /proc/self/mounts || true'",
        uri = f.c.nbd_uri(0, RES),
        cfg = f.c.config_path(0).display(),
        node = f.c.node_name(0),
        bins = bin_dir().display(),
        agent = agent().display(),
    );
    let t0 = Instant::now();
    let out = f.c.in_ns(0, &script).unwrap();
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stdout.contains("rc=1"),
        "start should fail with OCF_ERR_GENERIC: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("did not finish within") || stdout.contains("did not finish within"),
        "the reason names the timeout: {stdout}\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(8),
        "start must end within the 8 s start timeout, took {took:?}"
    );
    assert!(
        stdout.trim_end().ends_with('0'),
        "nothing mounted at {dir_s}: {stdout}"
    );
    // No mount daemon for that directory is left (it could mount later otherwise).
    std::thread::sleep(Duration::from_millis(300));
    let left = std::process::Command::new("pgrep")
        .args(["-f", &format!("{} {dir_s}", f.c.nbd_uri(0, RES))])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "a mount daemon outlived the failed start: pids {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
