//! `tandem-lockd`: wires the replica task to the peer transport and the client socket, all
//! on one thread. Startup order: config, durable log, peer listener and dialers, client
//! socket, replica. Any durable-log failure stops the daemon (exit status 1): a replica that may have
//! lost acknowledged writes must not keep voting.

pub mod clients;
pub mod core_thread;
pub mod direct;
pub mod flow;
pub mod peer;

use crate::log_cache::LogCache;
use crate::node::{CoreConfig, NodeCore};
use crate::wal;
use core_thread::{CoreInput, CoreThread};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem_common::ClusterConfig;

/// Inputs queued for the replica task before senders wait (client connections and
/// peer readers then stop reading: backpressure). Every queued client request is ahead
/// of the next one, so a long queue is latency for everyone.
const CORE_QUEUE: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] tandem_common::ConfigError),
    #[error("no shared secret: set cluster.secret or cluster.secret-file")]
    NoSecret,
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("cannot start the replica: {0}")]
    Core(#[from] crate::node::CoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the replica stopped: {0}")]
    Stopped(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub config: PathBuf,
    pub node: String,
    /// Start with an empty log and wait to be added by `tandem-lockctl member add`.
    pub join: bool,
    /// Snapshot the table (and compact the log) every this many applied entries.
    pub snapshot_every_entries: u64,
}

/// Runs the daemon until the replica stops (durable-log failure) or the process is killed.
pub fn run(opts: Options) -> Result<(), DaemonError> {
    let config = Arc::new(ClusterConfig::load(&opts.config)?);
    let me = config.node(&opts.node)?.clone();
    let secret = Arc::new(config.cluster_secret().ok_or(DaemonError::NoSecret)?);
    let state_dir = config.node_state_dir(&me.name).join("lockd");
    std::fs::create_dir_all(&state_dir).map_err(io(format!("creating {}", state_dir.display())))?;
    let _ = std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700));
    let voters: Vec<u64> = config.nodes.iter().map(|n| u64::from(n.id)).collect();
    let initial = if opts.join {
        LogCache::default()
    } else {
        LogCache::bootstrap(&voters)
    };
    let (log, sink) = wal::open(&state_dir, initial)?;
    let lm = &config.lockmgr;
    let mut cfg = CoreConfig::new(me.node_id(), lm.election_ticks, lm.heartbeat_ticks);
    cfg.witness = me.witness;
    cfg.snapshot_every_entries = opts.snapshot_every_entries.max(1);
    let incarnation = rand::random::<u64>() >> 1;
    let core = NodeCore::new(cfg, log, sink, incarnation)?;
    tracing::info!(node = %me.name, id = me.id, incarnation, witness = me.witness, "tandem-lockd starting");

    // One thread for everything: the socket tasks and the replica (a task that blocks
    // the thread while it works, fsync included). A message read from a socket is then
    // handled on the thread that read it; a hand-off to a separate replica thread cost a
    // wake-up per message, and cross-CPU wake-ups are most of a commit's latency on
    // small virtual machines (docs/LOCKMGR.md "Performance"). Sockets are not read during
    // an fsync (nothing could act on what they carry until it ends), and bytes that did
    // not fit a socket's buffer wait until the replica yields (rare: appends are sent
    // before the fsync, and a full buffer means the peer is behind anyway). A panic of the
    // replica now ends the process directly (exit status 101) instead of being reported.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    let (core_tx, core_rx) = tokio::sync::mpsc::channel::<CoreInput>(CORE_QUEUE);
    let mut peers = BTreeMap::new();
    let mut dialers = Vec::new();
    for n in config.nodes.iter().filter(|n| n.id != me.id) {
        let out = Arc::new(direct::PeerOut::default());
        peers.insert(n.node_id(), out.clone());
        dialers.push((n.node_id(), n.lock_addr(), out));
    }
    let thread = CoreThread {
        core,
        inputs: core_rx,
        peers,
        tick: Duration::from_millis(lm.tick_ms),
    };

    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(me.lock_addr())
            .await
            .map_err(io(format!("listening on {}", me.lock_addr())))?;
        tokio::spawn(peer::listen(
            listener,
            config.clone(),
            me.node_id(),
            secret.clone(),
            core_tx.clone(),
        ));
        for (peer_id, addr, rx) in dialers {
            tokio::spawn(peer::dial_forever(
                peer_id,
                addr,
                me.node_id(),
                secret.clone(),
                rx,
            ));
        }
        let socket = config.lockd_socket(&me.name);
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(io(format!("binding {}", socket.display())))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("chmod {}", socket.display())))?;
        tokio::spawn(clients::listen(listener, core_tx.clone()));
        tracing::info!(socket = %socket.display(), peer_port = me.lock_port, "serving");
        drop(core_tx);
        // The replica ends only on failure (every listener keeps a sender).
        match thread.run().await {
            Ok(()) => Err(DaemonError::Stopped("input queue closed".into())),
            Err(e) => Err(DaemonError::Stopped(e.to_string())),
        }
    })
}
