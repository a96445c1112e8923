//! Real `tandem-lockd` processes (3 nodes on 127.0.0.1) driven through the client library:
//! lock hand-off with callbacks and value blocks, leader kill -9, restart and catch-up, node
//! death with orphaned locks and recovery, a wiped node rejoining, and garbage on both
//! sockets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_common::NodeId;
use tandem_lockmgr::client::{Callback, Client, ClientError};
use tandem_lockmgr::node::{CoreStatus, MemberChange};
use tandem_lockmgr::table::LockError;
use tandem_lockmgr::types::{Flags, Mode};

const LS: &str = "t:fs";
const DEADLINE: Duration = Duration::from_secs(30);

struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    procs: Vec<Option<Child>>,
    lock_ports: Vec<u16>,
    /// Extra daemon arguments (e.g. a small snapshot interval).
    extra: Vec<String>,
}

/// A free loopback port. Ports come from a per-process counter (starting at a base derived
/// from the pid) rather than from binding port 0, so tests running in parallel never pick
/// the same port between choosing it and the daemon binding it.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 2_000) * 16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = u16::try_from(20_000 + port % 40_000).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    fn start(n: usize) -> Self {
        Self::start_with(n, &[], &[])
    }

    fn start_with(n: usize, witnesses: &[usize], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "[cluster]\nname = \"t\"\nsecret = \"lock-test-secret\"\nstate-dir = \"{0}/state\"\nrun-dir = \"{0}/run\"\n\n[lockmgr]\ntick-ms = 25\nelection-ticks = 20\nheartbeat-ticks = 3\n",
            dir.path().display()
        );
        let mut lock_ports = Vec::new();
        for i in 1..=n {
            let port = free_port();
            lock_ports.push(port);
            text.push_str(&format!(
                "\n[[node]]\nname = \"n{i}\"\nid = {i}\naddress = \"127.0.0.1\"\nlock-port = {port}\nreplication-port = {}\nwitness = {}\n",
                free_port(),
                witnesses.contains(&i)
            ));
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, text).unwrap();
        let mut c = Cluster {
            dir,
            config,
            procs: (0..n).map(|_| None).collect(),
            lock_ports,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 1..=n {
            c.spawn(i, false);
        }
        c
    }

    fn spawn(&mut self, i: usize, join: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("n{i}.log")))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem-lockd"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(format!("n{i}"))
            .stdout(Stdio::null())
            .stderr(log);
        if join {
            cmd.arg("--join");
        }
        cmd.args(&self.extra);
        self.procs[i - 1] = Some(cmd.spawn().unwrap());
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i - 1].take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn alive(&mut self, i: usize) -> bool {
        self.procs[i - 1]
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn socket(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("run/n{i}/lockd.sock"))
    }

    fn state(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("state/n{i}"))
    }

    async fn status(&self, i: usize) -> Option<CoreStatus> {
        let c = Client::connect_status_only(&self.socket(i)).await.ok()?;
        tokio::time::timeout(Duration::from_secs(2), c.status())
            .await
            .ok()?
            .ok()
    }

    /// Waits until some live node among `among` reports itself leader.
    async fn leader(&self, among: &[usize]) -> usize {
        let start = Instant::now();
        loop {
            for &i in among {
                if let Some(s) = self.status(i).await {
                    if s.leader == Some(s.id) {
                        return i;
                    }
                }
            }
            assert!(start.elapsed() < DEADLINE, "no leader among {among:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn client(&self, i: usize) -> Client {
        let start = Instant::now();
        loop {
            match tokio::time::timeout(
                Duration::from_secs(5),
                Client::connect(&self.socket(i), "test"),
            )
            .await
            {
                Ok(Ok(c)) => return c,
                _ if start.elapsed() < DEADLINE => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok(Err(e)) => panic!("cannot open a session on n{i}: {e}"),
                Err(_) => panic!("opening a session on n{i} timed out"),
            }
        }
    }

    async fn wait_for<F: Fn(&CoreStatus) -> bool>(&self, i: usize, what: &str, f: F) {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Some(s) = self.status(i).await {
                if f(&s) {
                    return;
                }
                last = Some(s);
            }
            assert!(
                start.elapsed() < DEADLINE,
                "n{i}: timed out waiting for {what}; last status {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=self.procs.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for i in 1..=self.procs.len() {
                let log = std::fs::read_to_string(self.dir.path().join(format!("n{i}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- n{i} log tail ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_hands_off_across_nodes_with_callback_and_value_block() {
    let cluster = Cluster::start(3);
    cluster.leader(&[1, 2, 3]).await;
    let mut a = cluster.client(1).await;
    let b = cluster.client(2).await;
    let mut a_calls = a.take_callbacks().unwrap();
    let first = within("first lock", a.lock(LS, b"res", Mode::EX, Flags::default()))
        .await
        .unwrap();
    assert_eq!(first.lvb, [0; 32]);
    // NOQUEUE fails while A holds it.
    let e = b
        .lock(LS, b"res", Mode::PR, Flags::NOQUEUE)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Lock(LockError::WouldBlock)), "{e}");
    let waiter = tokio::spawn(async move {
        let g = b.lock(LS, b"res", Mode::PR, Flags::default()).await;
        (b, g)
    });
    let cb = within("blocking callback", a_calls.recv()).await.unwrap();
    assert_eq!(
        cb,
        Callback::Blocking {
            lock: first.lock,
            wanted: Mode::PR
        }
    );
    within("unlock", a.unlock(first.lock, Some([7; 32])))
        .await
        .unwrap();
    let (_b, second) = within("hand-off", waiter).await.unwrap();
    let second = second.unwrap();
    assert_eq!(
        second.lvb, [7; 32],
        "value block written on release from EX"
    );
    assert!(second.token > first.token, "fencing tokens increase");
    // The listing shows the holder.
    let c = Client::connect_status_only(&cluster.socket(3))
        .await
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let listed = c.locks(LS).await.unwrap();
        // n3 applies the log a little later than n2; wait for the hand-off to show.
        if listed.len() == 1
            && listed[0].granted.len() == 1
            && listed[0].granted[0].granted == Some(Mode::PR)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n3 never showed the lock: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_continue_after_leader_kill_and_restarted_node_catches_up() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader(&[1, 2, 3]).await;
    let others: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    // Load: six clients on the two surviving nodes, half on one contended resource.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for k in 0..6usize {
        let c = cluster.client(others[k % 2]).await;
        let (done, stop) = (done.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let resource = if k % 2 == 0 {
                b"shared".to_vec()
            } else {
                vec![k as u8]
            };
            let mut mine = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let g = c
                    .lock(LS, &resource, Mode::EX, Flags::default())
                    .await
                    .unwrap();
                c.unlock(g.lock, None).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
                mine += 1;
            }
            mine
        }));
    }
    let wait_ops = |target: u64| {
        let done = done.clone();
        async move {
            while done.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    within("load before the kill", wait_ops(30)).await;
    cluster.kill(leader); // SIGKILL under load
    let at_kill = done.load(Ordering::Relaxed);
    // Every client keeps working through the re-election; they only see latency.
    within("load after the leader died", wait_ops(at_kill + 100)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let mine = within("client loop", l).await.unwrap();
        assert!(mine > 0);
    }
    let new_leader = cluster.leader(&others).await;
    assert_ne!(new_leader, leader);
    // Restart the killed node on its data directory: it catches up and serves again.
    cluster.spawn(leader, false);
    let target = cluster.status(new_leader).await.unwrap().commit_index;
    cluster
        .wait_for(leader, "catch-up", |s| s.applied_index >= target)
        .await;
    let c3 = cluster.client(leader).await;
    let g = within(
        "lock on the restarted node",
        c3.lock(LS, b"shared", Mode::PR, Flags::default()),
    )
    .await
    .unwrap();
    c3.unlock(g.lock, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_nodes_locks_stay_orphaned_until_recovery_done() {
    let mut cluster = Cluster::start(3);
    cluster.leader(&[1, 2, 3]).await;
    let victim = cluster.client(3).await;
    victim
        .lock(LS, b"journal3", Mode::EX, Flags::default())
        .await
        .unwrap();
    victim
        .lock(LS, b"inode", Mode::EX, Flags::default())
        .await
        .unwrap();
    let survivor = cluster.client(1).await;
    let recoverer = cluster.client(2).await;
    cluster.kill(3);
    // Three voters: the leader declares n3 down and fenced by quorum.
    cluster
        .wait_for(1, "n3 declared down", |s| {
            s.nodes
                .iter()
                .any(|n| n.node == NodeId(3) && !n.up && n.fenced && n.orphaned_locks == 2)
        })
        .await;
    let waiter = tokio::spawn(async move {
        let g = survivor
            .lock(LS, b"inode", Mode::PR, Flags::default())
            .await;
        (survivor, g)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "an orphaned lock was granted away");
    // Journal recovery takes the dead node's journal lock despite the orphan.
    let j = within(
        "recovery lock",
        recoverer.lock(LS, b"journal3", Mode::EX, Flags::RECOVERY),
    )
    .await
    .unwrap();
    assert!(!waiter.is_finished());
    within("recovery-done", recoverer.recovery_done(NodeId(3), LS))
        .await
        .unwrap();
    let (_s, g) = within("waiter after recovery", waiter).await.unwrap();
    assert!(g.unwrap().token > j.token);
    cluster
        .wait_for(1, "orphans purged", |s| {
            s.nodes.iter().all(|n| n.orphaned_locks == 0)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_rejoins_through_member_add() {
    let mut cluster = Cluster::start(3);
    cluster.leader(&[1, 2, 3]).await;
    let admin = cluster.client(1).await;
    let g = admin
        .lock(LS, b"x", Mode::EX, Flags::default())
        .await
        .unwrap();
    admin.unlock(g.lock, None).await.unwrap();
    cluster.kill(3);
    std::fs::remove_dir_all(cluster.state(3)).unwrap();
    within(
        "member remove",
        admin.member(MemberChange::Remove(NodeId(3))),
    )
    .await
    .unwrap();
    cluster.spawn(3, true);
    // First as a learner (catches up without voting), then promoted to voter.
    within(
        "member add --learner",
        admin.member(MemberChange::AddLearner(NodeId(3))),
    )
    .await
    .unwrap();
    cluster
        .wait_for(1, "n3 a learner", |s| s.learners.contains(&NodeId(3)))
        .await;
    within(
        "member add",
        admin.member(MemberChange::AddVoter(NodeId(3))),
    )
    .await
    .unwrap();
    let target = cluster.status(1).await.unwrap().commit_index;
    cluster
        .wait_for(3, "rejoined and caught up", |s| {
            s.applied_index >= target && s.voters.contains(&NodeId(3))
        })
        .await;
    // It joined the cluster, not a cluster of its own.
    let s1 = cluster.status(1).await.unwrap();
    let s3 = cluster.status(3).await.unwrap();
    assert_eq!(s3.voters.len(), 3, "{s3:?}");
    assert_eq!(s3.leader, s1.leader);
    assert_eq!(s3.term, s1.term);
    let c3 = cluster.client(3).await;
    let g = within(
        "lock on the rejoined node",
        c3.lock(LS, b"x", Mode::EX, Flags::default()),
    )
    .await
    .unwrap();
    assert!(g.token.0 >= 2);
}

fn write_garbage(path: &Path, bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    reply
}

/// Writes, closes the write side, and reads until the daemon closes.
fn write_garbage_then_half_close(path: &Path, bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_client_socket_and_peer_port_is_refused() {
    let mut cluster = Cluster::start(3);
    cluster.leader(&[1, 2, 3]).await;
    let sock = cluster.socket(1);
    let good = cluster.client(1).await;
    for attempt in 0..20u8 {
        let junk: Vec<u8> = (0..200u16)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(attempt))
            .collect();
        let path = sock.clone();
        let reply = tokio::task::spawn_blocking(move || write_garbage(&path, &junk))
            .await
            .unwrap();
        // Either an Error frame or a plain close; never a hang, never a crash.
        assert!(reply.len() < 4096);
    }
    // A valid frame header around an undecodable payload.
    let framed =
        tandem_common::frame::frame_bytes(tandem_common::frame::Channel::LockClient, &[0xff; 40]);
    let path = sock.clone();
    let reply = tokio::task::spawn_blocking(move || write_garbage(&path, &framed))
        .await
        .unwrap();
    assert!(!reply.is_empty(), "expected an error frame");
    // Garbage and an unauthenticated raft-looking frame on the peer port.
    for port in cluster.lock_ports.clone() {
        for payload in [
            vec![0x42u8; 5000],
            tandem_common::frame::frame_bytes(
                tandem_common::frame::Channel::LockPeer,
                &[8, 1, 16, 2],
            ),
        ] {
            tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = s.write_all(&payload);
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            })
            .await
            .unwrap();
        }
    }
    // A well-formed conversation with a reserved request id gets an error, not silence.
    let path = sock.clone();
    let reply = tokio::task::spawn_blocking(move || {
        use tandem_common::frame::{encode, Channel};
        use tandem_lockmgr::proto::{ClientReply, ClientRequest};
        use tandem_lockmgr::types::ReqId;
        let mut bytes = encode(
            Channel::LockClient,
            &ClientRequest::Hello {
                min_version: 1,
                max_version: 1,
                client: "raw".into(),
                open_session: false,
            },
        )
        .unwrap();
        bytes.extend(
            encode(
                Channel::LockClient,
                &ClientRequest::Status { req: ReqId(0) },
            )
            .unwrap(),
        );
        let reply = write_garbage_then_half_close(&path, &bytes);
        let mut at = 0;
        let mut out = Vec::new();
        while let Ok(Some((m, used))) = tandem_common::frame::decode_from_buf::<ClientReply>(
            &reply[at..],
            Channel::LockClient,
            1 << 20,
        ) {
            out.push(m);
            at += used;
        }
        out
    })
    .await
    .unwrap();
    assert!(matches!(
        reply[0],
        tandem_lockmgr::proto::ClientReply::Welcome { session: None, .. }
    ));
    assert!(
        matches!(
            &reply[1],
            tandem_lockmgr::proto::ClientReply::Failed {
                error: LockError::Invalid(_),
                ..
            }
        ),
        "{reply:?}"
    );
    for i in 1..=3 {
        assert!(cluster.alive(i), "n{i} died on garbage");
    }
    // The daemon keeps serving: the earlier session still works.
    let g = within(
        "lock after garbage",
        good.lock(LS, b"after", Mode::EX, Flags::default()),
    )
    .await
    .unwrap();
    good.unlock(g.lock, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_client_releases_its_locks() {
    let cluster = Cluster::start(3);
    cluster.leader(&[1, 2, 3]).await;
    let a = cluster.client(1).await;
    let b = cluster.client(2).await;
    a.lock(LS, b"held", Mode::EX, Flags::default())
        .await
        .unwrap();
    let waiter = tokio::spawn(async move { b.lock(LS, b"held", Mode::EX, Flags::default()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    // A third client gives up waiting: its request is cancelled, not left queued.
    let c = cluster.client(3).await;
    let e = c
        .lock_timeout(
            LS,
            b"held",
            Mode::PR,
            Flags::default(),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Lock(LockError::Cancelled)), "{e}");
    drop(a); // the connection closes: the session and its locks go away
    within("grant after disconnect", waiter)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_and_a_witness_survive_a_node_loss() {
    let mut cluster = Cluster::start_with(3, &[3], &[]);
    cluster.leader(&[1, 2, 3]).await;
    match Client::connect(&cluster.socket(3), "x").await {
        Err(ClientError::Refused(m)) => assert!(m.contains("witness"), "{m}"),
        other => panic!(
            "a witness must refuse sessions, got {:?}",
            other.map(|_| ())
        ),
    }
    let c1 = cluster.client(1).await;
    let g = c1.lock(LS, b"w", Mode::EX, Flags::default()).await.unwrap();
    c1.unlock(g.lock, None).await.unwrap();
    // n2 must have announced itself: a node that never joined has nothing to declare down.
    cluster
        .wait_for(3, "n2 up", |s| {
            s.nodes.iter().any(|n| n.node == NodeId(2) && n.up)
        })
        .await;
    cluster.kill(2);
    // n1 and the witness are a majority: locking goes on.
    let g = within(
        "lock with one data node down",
        c1.lock(LS, b"w", Mode::EX, Flags::default()),
    )
    .await
    .unwrap();
    c1.unlock(g.lock, None).await.unwrap();
    cluster
        .wait_for(3, "witness sees n2 down", |s| {
            s.nodes.iter().any(|n| n.node == NodeId(2) && !n.up)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_from_a_snapshot_after_compaction() {
    let mut cluster = Cluster::start_with(3, &[], &["--snapshot-every", "40"]);
    cluster.leader(&[1, 2, 3]).await;
    let c = cluster.client(1).await;
    cluster.kill(3);
    for i in 0..120u32 {
        let g = c
            .lock(LS, &i.to_le_bytes(), Mode::EX, Flags::default())
            .await
            .unwrap();
        c.unlock(g.lock, None).await.unwrap();
    }
    let wal = cluster.state(1).join("lockd/raft.wal");
    // The file itself is longer: preallocated zeros follow the log.
    let size = tandem_lockmgr::wal::valid_len(&wal).unwrap();
    assert!(size < 64 << 10, "log not compacted: {size} bytes");
    cluster.spawn(3, false);
    let target = cluster.status(1).await.unwrap().commit_index;
    cluster
        .wait_for(3, "catch-up by snapshot", |s| s.applied_index >= target)
        .await;
    let c3 = cluster.client(3).await;
    let g = within(
        "lock on the caught-up node",
        c3.lock(LS, b"z", Mode::PR, Flags::default()),
    )
    .await
    .unwrap();
    assert!(
        g.token.0 > 120,
        "token {} does not continue the history",
        g.token
    );
    // And the leader restarts from its compacted log.
    drop(c);
    cluster.kill(1);
    cluster.spawn(1, false);
    cluster
        .wait_for(1, "restart from compacted log", |s| {
            s.applied_index >= target
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_scenarios_run_against_a_cluster() {
    let cluster = Cluster::start(3);
    cluster.leader(&[1, 2, 3]).await;
    cluster.client(1).await; // n1 has announced itself and accepts sessions
    let socket = cluster.socket(1);
    let single = tandem_lockmgr::bench::single(&socket, "bench:t", 20)
        .await
        .unwrap();
    assert_eq!(single.len(), 20);
    let pairs =
        tandem_lockmgr::bench::loops(&socket, "bench:t", 4, false, Duration::from_millis(500))
            .await
            .unwrap();
    let handoffs =
        tandem_lockmgr::bench::loops(&socket, "bench:t", 3, true, Duration::from_millis(500))
            .await
            .unwrap();
    assert!(
        pairs > 0 && handoffs > 0,
        "{pairs} pairs, {handoffs} hand-offs"
    );
    // Measured on the WAL's own directory (may be ~0 on tmpfs).
    for how in [
        tandem_lockmgr::bench::SyncedWrite::Append,
        tandem_lockmgr::bench::SyncedWrite::Preallocated,
    ] {
        tandem_lockmgr::bench::fsync_p50_us(&cluster.state(1), 5, how).unwrap();
    }
}
