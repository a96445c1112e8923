//! One replicated resource on this node: its local disk and metadata, its role, its view of
//! every peer, and the decisions that tie them together. I/O paths are in `io.rs`, the
//! resync and the handling of a peer's messages in `sync.rs`; sockets are in `crate::peer`.
//!
//! Locking: `inner` (a parking_lot mutex) is held only for short, non-async sections; the
//! metadata is written under `meta` (a tokio mutex, because writes fsync).

mod al;
pub mod bitmap;
pub mod core;
pub mod decide;
mod detach;
mod dirty;
mod handshake;
mod io;
mod peerack;
mod quorum;
pub mod ranges;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_mint;
#[cfg(test)]
mod sim_tiebreak;
mod status;
mod sync;
mod target_io;
pub mod tiebreak;
mod topology;
mod verify;

pub use io::IoError;
pub use status::{PeerStatus, ResourceStatus, SyncProgressView};
pub use sync::SessionEnd;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tandem_common::config::{ClusterConfig, OnNoQuorum, Protocol, Quorum, ResourceConfig};
use tandem_common::frame::{self, Channel};
use tandem_common::NodeId;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::backing::Backing;
use crate::meta::format::{
    Superblock, FLAG_CRASHED_HERE, FLAG_CRASHED_PRIMARY, FLAG_LOST_QUORUM, FLAG_WAS_PRIMARY,
};
use crate::meta::{self, MetaStore};
use crate::proto::{PeerMsg, PeerState};
use crate::state::{ConnState, DiskState, ReplState, Role};
use core::set_primary_at_loss;
use decide::Generation;
use ranges::RangeLocks;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Meta(#[from] meta::MetaError),
    #[error("{0}")]
    Backing(#[from] crate::backing::BackingError),
    #[error("{0}")]
    Refused(String),
}

/// Static settings of a resource on this node, resolved from the config.
#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub node_name: String,
    pub node_id: NodeId,
    pub protocol: Protocol,
    pub allow_two_primaries: bool,
    pub resync_rate_bytes_per_s: Option<u64>,
    pub resync_fill_target_bytes: u64,
    pub quorum: Quorum,
    pub on_no_quorum: OnNoQuorum,
    pub sb_policy: decide::SbPolicy,
    pub split_brain_handler: Option<String>,
    pub on_io_error: tandem_common::config::OnIoError,
    /// Every other member: id and name.
    pub peers: Vec<(NodeId, String)>,
    /// This node has no disk for the resource: a tiebreaker (see `tiebreak.rs`).
    pub diskless: bool,
    /// Members without a disk: they vote for quorum but get no data and no bitmap.
    pub tiebreakers: BTreeSet<NodeId>,
    pub secret: Vec<u8>,
}

impl Settings {
    pub fn from_config(
        config: &ClusterConfig,
        res: &ResourceConfig,
        node: &str,
    ) -> Result<Self, EngineError> {
        let me = config.node(node).map_err(meta::MetaError::from)?;
        let peers: Vec<(NodeId, String)> = config
            .resource_node_names(res)
            .into_iter()
            .filter(|n| n != node)
            .filter_map(|n| config.node(&n).ok().map(|c| (c.node_id(), n.clone())))
            .collect();
        let tiebreakers = peers
            .iter()
            .filter(|(_, n)| config.is_diskless(res, n))
            .map(|(id, _)| *id)
            .collect();
        Ok(Self {
            name: res.name.clone(),
            node_name: node.to_string(),
            node_id: me.node_id(),
            protocol: res.protocol,
            allow_two_primaries: res.allow_two_primaries,
            resync_rate_bytes_per_s: res.resync_rate_bytes_per_s(),
            resync_fill_target_bytes: res.resync_fill_target_bytes(),
            quorum: res.quorum_policy().map_err(EngineError::Refused)?,
            on_no_quorum: res.on_no_quorum,
            sb_policy: decide::SbPolicy {
                zero: res.after_sb_0pri,
                one: res.after_sb_1pri,
            },
            split_brain_handler: res.split_brain_handler.clone(),
            on_io_error: res.on_io_error,
            peers,
            diskless: config.is_diskless(res, node),
            tiebreakers,
            secret: config
                .secret_for(res)
                .ok_or_else(|| EngineError::Refused("no shared secret configured".into()))?,
        })
    }
}

/// Resync progress, kept on both ends.
#[derive(Clone, Debug)]
pub struct SyncProgress {
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub started: Instant,
}

type ReadReplyTx = oneshot::Sender<Result<Vec<u8>, String>>;

/// A live connection to a peer (owned by its session task).
pub struct Conn {
    pub peer: NodeId,
    pub epoch: u64,
    out: mpsc::Sender<Arc<Vec<u8>>>,
    pending: Mutex<BTreeMap<u64, oneshot::Sender<Result<(), String>>>>,
    closed: AtomicBool,
    /// Application writes queued on this connection (protocols A/B: decides what a
    /// broken connection may have lost).
    pub writes_sent: AtomicU64,
    /// Diskless reads waiting for the peer's data.
    read_pending: Mutex<BTreeMap<u64, ReadReplyTx>>,
    /// Verify requests waiting for the peer's checksums.
    verify_pending: Mutex<BTreeMap<u64, oneshot::Sender<Vec<u32>>>>,
    /// Flips to true on close so the session's reader wakes up.
    closed_signal: tokio::sync::watch::Sender<bool>,
    /// From our first `State` until our handshake decision: application writes wait
    /// (handshake.rs).
    handshaking: AtomicBool,
    /// When the connection was opened (bounds how long a handshake keeps writes waiting).
    opened: Instant,
    /// True once the session is over, cleanup included (handshake.rs).
    ended: tokio::sync::watch::Sender<bool>,
}

impl Conn {
    pub fn new(peer: NodeId, epoch: u64, out: mpsc::Sender<Arc<Vec<u8>>>) -> Arc<Self> {
        Arc::new(Self {
            peer,
            epoch,
            out,
            pending: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            writes_sent: AtomicU64::new(0),
            verify_pending: Mutex::new(BTreeMap::new()),
            read_pending: Mutex::new(BTreeMap::new()),
            closed_signal: tokio::sync::watch::channel(false).0,
            handshaking: AtomicBool::new(true),
            opened: Instant::now(),
            ended: tokio::sync::watch::channel(false).0,
        })
    }

    /// A receiver that changes to true when the connection is closed.
    pub fn closed_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed_signal.subscribe()
    }

    /// Queues a pre-encoded frame; false if the connection is gone.
    pub async fn send_frame(&self, frame: Arc<Vec<u8>>) -> bool {
        !self.closed.load(Ordering::Acquire) && self.out.send(frame).await.is_ok()
    }

    pub async fn send(&self, msg: &PeerMsg) -> bool {
        match frame::encode(Channel::Replication, msg) {
            Ok(f) => self.send_frame(Arc::new(f)).await,
            Err(_) => false,
        }
    }

    /// Expects an ack for `seq`; the receiver errors if the connection drops first.
    pub fn expect_ack(&self, seq: u64) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        if !self.closed.load(Ordering::Acquire) {
            self.pending.lock().insert(seq, tx);
        }
        rx
    }

    pub fn complete(&self, seq: u64, result: Result<(), String>) {
        if let Some(tx) = self.pending.lock().remove(&seq) {
            let _ = tx.send(result);
        }
    }

    /// Marks the connection dead and fails every pending request.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.pending.lock().clear();
        self.verify_pending.lock().clear();
        self.read_pending.lock().clear();
        self.closed_signal.send_replace(true);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Our view of one configured peer.
#[derive(Clone)]
pub struct PeerView {
    pub name: String,
    pub conn_state: ConnState,
    pub repl: ReplState,
    pub state: Option<PeerState>,
    pub conn: Option<Arc<Conn>>,
    pub sync: Option<SyncProgress>,
    /// Set by `disconnect` or a split brain: do not reconnect until `connect`.
    pub standalone: bool,
    pub last_error: Option<String>,
    /// `connect --discard-my-data` was requested for the next handshake.
    pub discard_my_data: bool,
    /// The rule that made us this peer's SyncTarget at the last handshake (see
    /// `core::target_keeps_lineage`).
    pub target_rule: Option<&'static str>,
    /// We are (or were) this crashed Primary's source by `peer-crashed-primary`: the
    /// `Uuids` that follows its resync is `mint_after_rollback`, and once we adopt it our
    /// other peers re-decide with us (we may be newer than they are now).
    pub rolled_back_peer: bool,
    /// The handshake made us this peer's SyncTarget and its SyncStart has not arrived:
    /// shown as WFBitMapT, and `primary` is refused, for those few milliseconds (our disk
    /// still reads UpToDate although the peer holds newer data).
    pub awaiting_source: bool,
    /// Progress of an online verify we run against this peer.
    pub verify: Option<SyncProgress>,
    /// Blocks found different by the last completed verify.
    pub last_verify_oos_blocks: Option<u64>,
}

struct Inner {
    role: Role,
    disk: DiskState,
    peers: BTreeMap<NodeId, PeerView>,
}

/// Counters shown in status.
#[derive(Default)]
pub struct Stats {
    pub writes: AtomicU64,
    pub reads: AtomicU64,
    pub written_bytes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub resync_sent_bytes: AtomicU64,
    pub resync_received_bytes: AtomicU64,
    pub conflicts: AtomicU64,
    /// Application writes that waited for a connection handshake (handshake.rs).
    pub handshake_waits: AtomicU64,
}

pub struct Resource {
    pub settings: Settings,
    backing: Backing,
    usable_bytes: u64,
    /// `None` on a diskless tiebreaker.
    meta: tokio::sync::Mutex<(Option<MetaStore>, Superblock)>,
    /// Copy of the persisted superblock for lock-free reads in hot paths.
    sb_cache: Mutex<Superblock>,
    /// Activity log (hot extents of a Primary), see `al.rs`.
    al: Mutex<al::ActivityLog>,
    /// Extents a crash may have left different (from the AL at attach), until resynced.
    crashed_extents: Mutex<Option<Vec<u64>>>,
    /// Dirty bitmap per peer (with its slot in the metadata), see `dirty.rs`.
    bitmaps: Mutex<BTreeMap<NodeId, (usize, bitmap::DirtyBitmap)>>,
    /// Bitmap pages with bits set in memory whose persist has not finished, with a count
    /// of their changes (dirty.rs). Locked only while `bitmaps` is held.
    bitmap_unpersisted: Mutex<dirty::UnpersistedPages<NodeId>>,
    inner: Mutex<Inner>,
    ranges: Arc<RangeLocks>,
    inflight: Arc<RangeLocks>,
    next_seq: AtomicU64,
    next_epoch: AtomicU64,
    /// The local disk failed and was detached (on-io-error = detach): I/O goes to peers.
    detached: AtomicBool,
    /// When the last application write started (resync backs off while writes flow).
    last_app_write: Mutex<Option<Instant>>,
    /// A connection came or went since the last generation we minted (see dirty.rs).
    conn_changed: AtomicBool,
    /// Serialises generation changes made on the write path.
    rotation_lock: tokio::sync::Mutex<()>,
    /// Writes of other Primaries applied here and not yet confirmed on all their targets
    /// (see peerack.rs).
    unconfirmed: Mutex<peerack::UnconfirmedWrites>,
    /// Blocks received by the resync we are target of (news for our other peers if the
    /// resync rolls our data back, see `core::target_rolls_back`).
    sync_received: Mutex<Option<bitmap::DirtyBitmap>>,
    /// As SyncTarget: blocks we held bits for against the source whose content the
    /// resync changed (`note_replaced`), marked for our other peers at `SyncDone`.
    sync_replaced: Mutex<Option<bitmap::DirtyBitmap>>,
    /// Held shared by an application write from its generation check until it is queued
    /// to every peer; `Topology` takes it exclusively (see topology.rs).
    topology_gate: tokio::sync::RwLock<()>,
    /// Blocks written by application writes since this node became a SyncTarget: resync
    /// data must not overwrite them (it may be older).
    sync_shadow: Mutex<Option<bitmap::DirtyBitmap>>,
    /// As SyncTarget: partial application writes of blocks not yet current here, laid
    /// again on top of the resync data for them (target_io.rs).
    sync_overlays: Mutex<target_io::Overlays>,
    /// As SyncTarget: orders local writes of application data with writes of resync data
    /// (target_io.rs). Held only around local disk writes.
    sync_io: Arc<RangeLocks>,
    events: broadcast::Sender<String>,
    /// Wakes the dialers (on `connect`, `down`).
    pub wake: tokio::sync::Notify,
    /// Wakes writers suspended for quorum (on every connection change).
    quorum_changed: tokio::sync::Notify,
    /// Wakes writers waiting for a connection's handshake (handshake.rs).
    handshakes_done: tokio::sync::Notify,
    /// Connections whose handshake is running on our side (a fast path for writes).
    handshakes_running: AtomicUsize,
    /// Writes and flushes past their handshake check that have not recorded everything
    /// yet; a new connection's first `State` waits for none to be left (handshake.rs).
    writes_unsettled: AtomicU64,
    writes_settled: tokio::sync::Notify,
    down: AtomicBool,
    pub stats: Stats,
}

impl Resource {
    /// Attaches the local disk (metadata must exist) and returns the resource, Secondary.
    pub fn attach(
        config: &ClusterConfig,
        res: &ResourceConfig,
        node: &str,
        events: broadcast::Sender<String>,
    ) -> Result<Arc<Self>, EngineError> {
        let settings = Settings::from_config(config, res, node)?;
        if settings.diskless {
            return Ok(Self::attach_diskless(settings, events));
        }
        let (store, mut sb) = meta::open(config, res, node)?;
        let disk_path = config.disk_for(res, node).expect("plan checked the disk");
        let backing = Backing::open(&disk_path, res.io_engine)?;
        // A node that was Primary when it stopped without demoting crashed as Primary:
        // its disk may hold writes no peer acknowledged, so it must not win a resync.
        if sb.flags & FLAG_WAS_PRIMARY != 0 {
            sb.flags |= FLAG_CRASHED_PRIMARY | FLAG_CRASHED_HERE;
            sb.flags &= !FLAG_WAS_PRIMARY;
            store.write(&mut sb)?;
            tracing::warn!(resource = %res.name, "was Primary when it stopped: marked crashed-primary, will resync from a peer");
        }
        let mut al = al::ActivityLog::new(sb.usable_size_bytes, &store.read_al(&sb)?);
        let crashed_extents = if sb.flags & FLAG_CRASHED_PRIMARY != 0 && al.enabled {
            let marked = al.marked();
            tracing::info!(resource = %res.name, extents = marked.len(), "activity log of the crashed Primary: only these 4 MiB extents need a resync");
            Some(marked)
        } else {
            if al.enabled {
                let pages = al.clear();
                store.write_al_pages(&sb, &pages)?;
            }
            None
        };
        let mut bitmaps = BTreeMap::new();
        for (slot, p) in sb.peers.iter().enumerate() {
            let bytes = store.read_bitmap(&sb, slot)?;
            let bm = bitmap::DirtyBitmap::from_bytes(sb.usable_size_bytes, &bytes);
            if bm.count_bits() > 0 {
                tracing::info!(resource = %res.name, peer = %p.node_id, dirty_bytes = bm.dirty_bytes(), "dirty bitmap loaded");
            }
            bitmaps.insert(p.node_id, (slot, bm));
        }
        tracing::info!(resource = %res.name, disk = %disk_path.display(), engine = backing.engine_name(),
            size = sb.usable_size_bytes, state = %sb.disk_state, "attached");
        Ok(Self::build(
            settings,
            backing,
            Some(store),
            sb,
            al,
            crashed_extents,
            bitmaps,
            events,
        ))
    }

    /// A diskless tiebreaker: no disk, no metadata, never a replication target. Its
    /// superblock lives in memory and holds the data generation it vouches for.
    fn attach_diskless(settings: Settings, events: broadcast::Sender<String>) -> Arc<Self> {
        let sb = Superblock {
            flags: 0,
            seq: 0,
            usable_size_bytes: 0,
            backing_size_bytes: 0,
            node_id: settings.node_id,
            disk_state: DiskState::Diskless,
            current_uuid: 0,
            history_uuids: [0, 0],
            resource: settings.name.clone(),
            peers: Vec::new(),
            md_offset: 0,
            al_offset: 0,
            bitmap_offset: 0,
            bitmap_bytes_per_peer: 0,
        };
        tracing::info!(resource = %settings.name, "attached as a diskless tiebreaker: votes for quorum, stores no data");
        let r = Self::build(
            settings,
            Backing::none(),
            None,
            sb,
            al::ActivityLog::new(0, &[]),
            None,
            BTreeMap::new(),
            events,
        );
        r.detached.store(true, Ordering::Release);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        settings: Settings,
        backing: Backing,
        store: Option<MetaStore>,
        sb: Superblock,
        al: al::ActivityLog,
        crashed_extents: Option<Vec<u64>>,
        bitmaps: BTreeMap<NodeId, (usize, bitmap::DirtyBitmap)>,
        events: broadcast::Sender<String>,
    ) -> Arc<Self> {
        let peers = settings
            .peers
            .iter()
            .map(|(id, name)| {
                (
                    *id,
                    PeerView {
                        name: name.clone(),
                        conn_state: ConnState::Connecting,
                        repl: ReplState::Off,
                        state: None,
                        conn: None,
                        sync: None,
                        standalone: false,
                        last_error: None,
                        discard_my_data: false,
                        target_rule: None,
                        rolled_back_peer: false,
                        awaiting_source: false,
                        verify: None,
                        last_verify_oos_blocks: None,
                    },
                )
            })
            .collect();
        let r = Arc::new(Self {
            usable_bytes: sb.usable_size_bytes,
            inner: Mutex::new(Inner {
                role: Role::Secondary,
                disk: sb.disk_state,
                peers,
            }),
            sb_cache: Mutex::new(sb.clone()),
            al: Mutex::new(al),
            crashed_extents: Mutex::new(crashed_extents),
            bitmaps: Mutex::new(bitmaps),
            bitmap_unpersisted: Mutex::new(Default::default()),
            meta: tokio::sync::Mutex::new((store, sb)),
            settings,
            backing,
            ranges: RangeLocks::new(),
            inflight: RangeLocks::new(),
            next_seq: AtomicU64::new(1),
            next_epoch: AtomicU64::new(1),
            conn_changed: AtomicBool::new(true),
            last_app_write: Mutex::new(None),
            detached: AtomicBool::new(false),
            rotation_lock: tokio::sync::Mutex::new(()),
            topology_gate: tokio::sync::RwLock::new(()),
            unconfirmed: Mutex::new(Default::default()),
            sync_received: Mutex::new(None),
            sync_replaced: Mutex::new(None),
            sync_shadow: Mutex::new(None),
            sync_overlays: Mutex::new(Default::default()),
            sync_io: RangeLocks::new(),
            events,
            wake: tokio::sync::Notify::new(),
            quorum_changed: tokio::sync::Notify::new(),
            handshakes_done: tokio::sync::Notify::new(),
            handshakes_running: AtomicUsize::new(0),
            writes_unsettled: AtomicU64::new(0),
            writes_settled: tokio::sync::Notify::new(),
            down: AtomicBool::new(false),
            stats: Stats::default(),
        });
        r.emit("create", "resource", &format!("role:{}", Role::Secondary));
        r.emit("create", "device", &format!("disk:{}", r.disk()));
        r
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }
    pub fn usable_bytes(&self) -> u64 {
        self.usable_bytes
    }
    pub fn role(&self) -> Role {
        self.inner.lock().role
    }
    pub fn disk(&self) -> DiskState {
        self.inner.lock().disk
    }
    pub fn generation(&self) -> Generation {
        self.generation_for(None)
    }

    /// Our generation as seen by one peer: includes our bitmap uuid for that peer.
    pub fn generation_for(&self, peer: Option<NodeId>) -> Generation {
        let dirty = peer.is_some_and(|id| self.bitmap_dirty_bytes(id) > 0);
        let sb = self.sb_cache.lock();
        Generation {
            disk: sb.disk_state,
            current: sb.current_uuid,
            history: sb.history_uuids,
            crashed: sb.flags & (FLAG_CRASHED_PRIMARY | FLAG_LOST_QUORUM) != 0,
            bitmap: peer
                .and_then(|id| sb.peers.iter().find(|p| p.node_id == id))
                .map_or(0, |p| p.bitmap_uuid),
            dirty,
        }
    }
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Emits one DRBD events2-shaped line: `<kind> <object> name:<res> <fields>`.
    pub fn emit(&self, kind: &str, object: &str, fields: &str) {
        let line = format!("{kind} {object} name:{} {fields}", self.settings.name);
        tracing::debug!(event = %line);
        let _ = self.events.send(line);
    }

    pub fn local_state(&self, peer: NodeId) -> PeerState {
        let g = self.generation_for(Some(peer));
        PeerState {
            role: self.role(),
            disk: self.disk(),
            current_uuid: g.current,
            history_uuids: g.history,
            usable_size_bytes: self.usable_bytes,
            protocol: self.settings.protocol,
            allow_two_primaries: self.settings.allow_two_primaries,
            crashed_primary: g.crashed,
            sync_target: self.is_sync_target(),
            bitmap_uuid_for_you: g.bitmap,
            discard_my_data: self.peer_view(peer).is_some_and(|p| p.discard_my_data),
            changes_bytes: self.bitmap_dirty_bytes(peer),
            primary_at_loss: self.primary_at_loss(peer),
            crashed_extents: self.crashed_extents.lock().clone(),
            dirty_runs: self
                .bitmaps
                .lock()
                .get(&peer)
                .map_or(Some(Vec::new()), |(_, bm)| core::dirty_runs(bm)),
        }
    }

    /// Whether some peer is currently resyncing us.
    pub fn is_sync_target(&self) -> bool {
        self.inner
            .lock()
            .peers
            .values()
            .any(|p| p.repl == ReplState::SyncTarget && p.sync.is_some())
    }

    fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Persists the generation, disk state and flags (fsync) and mirrors them in memory.
    async fn persist<F: FnOnce(&mut Superblock)>(&self, change: F) -> Result<(), EngineError> {
        let mut guard = self.meta.lock().await;
        let (store, sb) = &mut *guard;
        let mut next = sb.clone();
        change(&mut next);
        // Metadata writes are small and rare; block_in_place keeps the fsync off the
        // async workers' queue without an extra thread hop. A diskless tiebreaker keeps
        // its view of the data's generation in memory only.
        match store {
            Some(store) => tokio::task::block_in_place(|| store.write(&mut next))?,
            None => next.seq += 1,
        }
        *sb = next;
        *self.sb_cache.lock() = sb.clone();
        Ok(())
    }

    fn set_disk(&self, disk: DiskState) {
        let changed = {
            let mut inner = self.inner.lock();
            let changed = inner.disk != disk;
            inner.disk = disk;
            changed
        };
        if changed {
            self.emit("change", "device", &format!("disk:{disk}"));
        }
    }

    /// Sends our state to every connected peer (after any change).
    async fn broadcast_state(&self) {
        for conn in self.connections() {
            conn.send(&PeerMsg::State(self.local_state(conn.peer)))
                .await;
        }
    }

    /// Peers we are connected to past the handshake: their slot's `primary_at_loss`
    /// follows our role (a link still in its handshake keeps the value from its loss,
    /// which the split-brain decision is about to read).
    fn live_peers(&self) -> Vec<NodeId> {
        self.inner
            .lock()
            .peers
            .iter()
            .filter(|(_, p)| p.conn.is_some() && p.repl != ReplState::Off)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether we were Primary the last time we were connected to `peer`.
    pub fn primary_at_loss(&self, peer: NodeId) -> bool {
        self.sb_cache
            .lock()
            .peers
            .iter()
            .any(|p| p.node_id == peer && p.primary_at_loss)
    }

    /// A handshake with `peer` succeeded: from now on its slot follows our role.
    pub(super) async fn track_role_for(&self, peer: NodeId) -> Result<(), EngineError> {
        let primary = self.role() == Role::Primary;
        if self.primary_at_loss(peer) != primary {
            self.persist(|sb| set_primary_at_loss(sb, &[peer], primary))
                .await?;
        }
        Ok(())
    }

    pub fn connections(&self) -> Vec<Arc<Conn>> {
        self.inner
            .lock()
            .peers
            .values()
            .filter_map(|p| p.conn.clone())
            .collect()
    }

    pub fn peer_view(&self, peer: NodeId) -> Option<PeerView> {
        self.inner.lock().peers.get(&peer).cloned()
    }

    fn update_peer<R>(&self, peer: NodeId, f: impl FnOnce(&mut PeerView) -> R) -> Option<R> {
        self.inner.lock().peers.get_mut(&peer).map(f)
    }

    fn set_repl(&self, peer: NodeId, repl: ReplState) {
        let name = self.update_peer(peer, |p| {
            let changed = p.repl != repl;
            p.repl = repl;
            changed.then(|| p.name.clone())
        });
        if let Some(Some(name)) = name {
            self.emit(
                "change",
                "peer-device",
                &format!("peer-node-id:{peer} conn-name:{name} replication:{repl}"),
            );
        }
    }

    fn set_conn_state(&self, peer: NodeId, state: ConnState) {
        let name = self.update_peer(peer, |p| {
            let changed = p.conn_state != state;
            p.conn_state = state;
            changed.then(|| p.name.clone())
        });
        if let Some(Some(name)) = name {
            self.emit(
                "change",
                "connection",
                &format!("peer-node-id:{peer} conn-name:{name} connection:{state}"),
            );
        }
    }

    // ----- roles -----

    /// Commands that need local data are refused on a diskless tiebreaker.
    pub fn refuse_if_diskless(&self, what: &str) -> Result<(), EngineError> {
        if self.settings.diskless {
            return Err(EngineError::Refused(format!(
                "refusing `{what}`: this node is a diskless tiebreaker of {} (no disk configured); it only votes for quorum. Run it on a node with a disk, or set resource.on.{}.disk",
                self.name(),
                self.settings.node_name
            )));
        }
        Ok(())
    }

    /// `tandemadm primary [--force]`.
    pub async fn promote(self: &Arc<Self>, force: bool) -> Result<(), EngineError> {
        self.refuse_if_diskless("primary")?;
        if self.role() == Role::Primary {
            return Ok(());
        }
        // A SyncTarget whose source is connected serves I/O through it (target_io.rs), so
        // it may be promoted, as DRBD allows; one still waiting for its source's
        // `SyncStart` may not (a few milliseconds: retry).
        let as_target = self.target_source().is_some();
        {
            let inner = self.inner.lock();
            if !as_target
                && inner
                    .peers
                    .values()
                    .any(|p| p.repl == ReplState::SyncTarget || p.awaiting_source)
            {
                return Err(EngineError::Refused(
                    "refusing to promote: this node is about to become SyncTarget and its resync source is not streaming yet; retry in a moment (`tandemadm status`)".into(),
                ));
            }
            if !self.settings.allow_two_primaries {
                if let Some(p) = inner.peers.values().find(|p| {
                    p.conn.is_some() && p.state.as_ref().is_some_and(|s| s.role == Role::Primary)
                }) {
                    return Err(EngineError::Refused(format!(
                        "refusing to promote: peer {} is Primary and allow-two-primaries is off; demote it first or set allow-two-primaries = true",
                        p.name
                    )));
                }
            }
        }
        let disk = self.disk();
        if disk != DiskState::UpToDate && !as_target {
            if !force {
                return Err(EngineError::Refused(format!(
                    "refusing to promote: local disk is {disk}, a Primary needs UpToDate data; run `tandemadm primary --force` only on the node whose data is good (this starts a full sync to the peers)"
                )));
            }
            tracing::warn!(resource = %self.name(), "forced promotion: declaring local data UpToDate");
            let fresh = rand::random::<u64>() | 1;
            self.persist(|sb| {
                if sb.current_uuid == 0 {
                    sb.current_uuid = fresh;
                } else {
                    sb.history_uuids = [sb.current_uuid, sb.history_uuids[0]];
                    sb.current_uuid = fresh;
                }
                sb.disk_state = DiskState::UpToDate;
                sb.flags &= !(FLAG_CRASHED_PRIMARY | FLAG_CRASHED_HERE);
            })
            .await?;
            self.set_disk(DiskState::UpToDate);
        }
        let live = self.live_peers();
        self.persist(|sb| {
            sb.flags |= FLAG_WAS_PRIMARY;
            set_primary_at_loss(sb, &live, true);
        })
        .await?;
        self.inner.lock().role = Role::Primary;
        self.emit("change", "resource", "role:Primary");
        self.broadcast_state().await;
        self.reevaluate_all().await;
        Ok(())
    }

    /// `tandemadm secondary`: waits for in-flight writes (range locks) implicitly because
    /// new writes are refused from now on.
    pub async fn demote(&self) -> Result<(), EngineError> {
        if self.role() == Role::Secondary {
            return Ok(());
        }
        self.inner.lock().role = Role::Secondary;
        let live = self.live_peers();
        self.persist(|sb| {
            sb.flags &= !FLAG_WAS_PRIMARY;
            set_primary_at_loss(sb, &live, false);
        })
        .await?;
        // Every write completed: nothing is hot any more.
        self.al_clear().await?;
        self.emit("change", "resource", "role:Secondary");
        self.broadcast_state().await;
        Ok(())
    }

    /// `new-current-uuid --clear-bitmap`: on fresh, empty disks, skip the initial sync.
    /// Every peer must be connected and without data.
    pub async fn new_current_uuid_clear_bitmap(&self) -> Result<(), EngineError> {
        self.refuse_if_diskless("new-current-uuid")?;
        let g = self.generation();
        if g.current != 0 || self.disk() != DiskState::Inconsistent {
            return Err(EngineError::Refused(
                "new-current-uuid --clear-bitmap is only for fresh disks (Inconsistent, no generation yet)".into(),
            ));
        }
        let conns = {
            let inner = self.inner.lock();
            let disk_peers = || {
                inner
                    .peers
                    .iter()
                    .filter(|(id, _)| !self.is_tiebreaker(**id))
                    .map(|(_, p)| p)
            };
            for p in disk_peers() {
                let fresh = p
                    .state
                    .as_ref()
                    .is_some_and(|s| s.current_uuid == 0 && s.disk == DiskState::Inconsistent);
                if p.conn.is_none() || !fresh {
                    return Err(EngineError::Refused(format!(
                        "peer {} must be Connected with a fresh Inconsistent disk first (see `tandemadm status`)",
                        p.name
                    )));
                }
            }
            disk_peers()
                .filter_map(|p| p.conn.clone())
                .collect::<Vec<_>>()
        };
        let uuid = rand::random::<u64>() | 1;
        self.persist(|sb| {
            sb.current_uuid = uuid;
            sb.disk_state = DiskState::UpToDate;
        })
        .await?;
        self.set_disk(DiskState::UpToDate);
        for c in conns {
            c.send(&PeerMsg::NewCurrentUuid { uuid }).await;
        }
        self.broadcast_state().await;
        Ok(())
    }

    // ----- connections -----

    /// The session for `conn` ended (error or shutdown).
    pub async fn on_disconnected(&self, conn: &Arc<Conn>, reason: &str, next: ConnState) {
        conn.close();
        let was_current = self
            .update_peer(conn.peer, |p| {
                if p.conn.as_ref().is_some_and(|c| c.epoch == conn.epoch) {
                    p.conn = None;
                    p.state = None;
                    p.sync = None;
                    p.awaiting_source = false;
                    p.last_error = Some(reason.to_string());
                    true
                } else {
                    false
                }
            })
            .unwrap_or(false);
        if !was_current {
            return;
        }
        tracing::warn!(resource = %self.name(), peer = %conn.peer, %reason, "connection lost");
        self.conn_changed.store(true, Ordering::Release);
        self.quorum_changed.notify_waiters();
        if self.quorum_needed() > 0 && !self.has_quorum() {
            tracing::warn!(resource = %self.name(), policy = ?self.settings.on_no_quorum, "quorum lost");
            self.emit("change", "device", "quorum:no");
        }
        self.set_repl(conn.peer, ReplState::Off);
        // Others may now need to (re)start a resync to us, or see our new state.
        self.broadcast_state().await;
        let standalone = self.peer_view(conn.peer).is_some_and(|p| p.standalone);
        self.set_conn_state(
            conn.peer,
            if standalone {
                ConnState::StandAlone
            } else {
                next
            },
        );
    }

    /// Remembers why the last connection attempt failed (shown in status).
    pub fn note_connect_error(&self, peer: NodeId, error: &str) {
        self.update_peer(peer, |p| {
            if p.conn.is_none() {
                p.last_error = Some(error.to_string());
            }
        });
    }

    /// `tandemadm disconnect`: drop and stay StandAlone.
    pub fn admin_disconnect(&self) {
        let conns: Vec<_> = {
            let mut inner = self.inner.lock();
            inner
                .peers
                .values_mut()
                .filter_map(|p| {
                    p.standalone = true;
                    p.conn.clone()
                })
                .collect()
        };
        for c in conns {
            c.close();
        }
        for (id, _) in self.settings.peers.clone() {
            self.set_conn_state(id, ConnState::StandAlone);
        }
    }

    /// `tandemadm connect [--discard-my-data]`.
    pub fn admin_connect(&self, discard_my_data: bool) {
        let ids: Vec<NodeId> = self.settings.peers.iter().map(|p| p.0).collect();
        for id in ids {
            let reconnect = self
                .update_peer(id, |p| {
                    p.discard_my_data = discard_my_data;
                    let was = p.standalone;
                    p.standalone = false;
                    was
                })
                .unwrap_or(false);
            if reconnect {
                self.set_conn_state(id, ConnState::Connecting);
            }
        }
        self.wake.notify_waiters();
    }

    /// `tandemadm down`: stop serving; sessions notice and end.
    pub fn shut_down(&self) {
        self.down.store(true, Ordering::Release);
        for c in self.connections() {
            c.close();
        }
        self.wake.notify_waiters();
    }

    /// Clean shutdown also clears the was-Primary flag (an orderly stop is no crash).
    pub async fn detach_cleanly(&self) {
        self.shut_down();
        if self.role() == Role::Primary {
            let _ = self.demote().await;
        }
        let _ = self.backing.sync().await;
    }
}
