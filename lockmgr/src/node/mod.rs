//! One lock-manager replica, sans-IO: a raft-rs `RawNode` over the lock table plus the
//! per-node duties around it (proposal batching and retry, failure detection, self-fencing,
//! snapshots). The daemon and the deterministic simulation drive the very same code:
//! events in (`tick`, `step`, `propose`, …), then `process()` returns messages to send and
//! effects for this node's client sessions. Durable writes go through a `LogSink` and are
//! synced before anything that depends on them leaves the node.

mod interface;

pub use interface::{
    CoreConfig, CoreError, CoreStatus, LogSink, MemberChange, NodeHealth, Output, Probe, SinkError,
};

use crate::log_cache::{LogCache, LogRecord};
use crate::table::{Command, Effect, EndReason, LockTable};
use crate::types::{ReqId, SessionId};
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot,
};
use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tandem_common::NodeId;

/// Version byte of the entry payload (`Batch`) and snapshot payload (`SnapshotData`).
pub const ENTRY_FORMAT_VERSION: u8 = 1;
/// Most commands folded into one Raft entry.
const MAX_COMMANDS_PER_ENTRY: usize = 1024;

/// The payload of a normal Raft entry.
#[derive(Serialize, Deserialize)]
struct Batch {
    version: u8,
    cmds: Vec<Command>,
}

/// The payload of a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    version: u8,
    table: LockTable,
}

/// Log entries and snapshots: the limit keeps a corrupt or hostile length prefix from
/// reserving an absurd amount of memory before decoding fails.
fn bincode_cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 256 << 20 }>()
}

/// Identifies a proposal so retries and their application can be matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Open(SessionId),
    Req(SessionId, ReqId),
    Close(SessionId),
    Restart(NodeId, u64),
    Other,
}

fn key_of(cmd: &Command) -> Key {
    match cmd {
        Command::OpenSession { session, .. } => Key::Open(*session),
        Command::CloseSession { session } => Key::Close(*session),
        Command::Lock { session, req, .. }
        | Command::Convert { session, req, .. }
        | Command::Unlock { session, req, .. }
        | Command::Cancel { session, req, .. }
        | Command::CancelRequest { session, req, .. }
        | Command::FenceAck { session, req, .. }
        | Command::RecoveryDone { session, req, .. } => Key::Req(*session, *req),
        Command::NodeRestart { node, incarnation } => Key::Restart(*node, *incarnation),
        Command::NodeDown { .. } => Key::Other,
    }
}

pub struct NodeCore<K: LogSink> {
    raw: RawNode<LogCache>,
    sink: K,
    table: LockTable,
    cfg: CoreConfig,
    incarnation: u64,
    now: u64,
    applied: u64,
    last_snapshot_index: u64,
    pending: BTreeMap<Key, (Command, u64)>,
    outbox: Vec<Command>,
    last_heard: BTreeMap<u64, u64>,
    last_leader_contact: u64,
    was_leader: bool,
    down_proposed: BTreeMap<NodeId, u64>,
    local_sessions: BTreeSet<SessionId>,
    pending_conf: BTreeMap<(SessionId, ReqId), (MemberChange, u64)>,
    /// Take a snapshot at the end of this Ready (the configuration changed).
    snapshot_now: bool,
    /// Tick of the last "log lost" error, to log it once in a while rather than per message.
    lost_log_logged_at: u64,
    /// Snapshots sent to peers, by send tick: raft-rs pauses a peer until the snapshot is
    /// reported, so a lost snapshot message must be reported as failed to be resent.
    snapshots_sent: BTreeMap<u64, u64>,
    out: Output,
    poisoned: bool,
}

fn raft_id(n: NodeId) -> u64 {
    u64::from(n.0)
}

fn node_id(id: u64) -> Option<NodeId> {
    u8::try_from(id).ok().map(NodeId)
}

fn decode_snapshot(snap: &Snapshot) -> Result<LockTable, CoreError> {
    if snap.data.is_empty() {
        return Ok(LockTable::new());
    }
    let (data, _): (SnapshotData, usize) =
        bincode::serde::decode_from_slice(&snap.data, bincode_cfg())
            .map_err(|e| CoreError::Snapshot(e.to_string()))?;
    if data.version != ENTRY_FORMAT_VERSION {
        return Err(CoreError::Snapshot(format!(
            "snapshot format {} (this build reads {ENTRY_FORMAT_VERSION})",
            data.version
        )));
    }
    Ok(data.table)
}

impl<K: LogSink> NodeCore<K> {
    /// Starts a replica from its durable log. `incarnation` must differ on every start.
    pub fn new(
        cfg: CoreConfig,
        log: LogCache,
        sink: K,
        incarnation: u64,
    ) -> Result<Self, CoreError> {
        let table = decode_snapshot(log.latest_snapshot())?;
        let applied = log.latest_snapshot().get_metadata().index;
        let raft_cfg = raft::Config {
            id: raft_id(cfg.id),
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            min_election_tick: cfg.election_ticks_range.map_or(0, |r| r.0),
            max_election_tick: cfg.election_ticks_range.map_or(0, |r| r.1),
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_cfg, log, &logger)?;
        let mut core = Self {
            raw,
            sink,
            table,
            incarnation,
            now: 0,
            applied,
            last_snapshot_index: applied,
            pending: BTreeMap::new(),
            outbox: Vec::new(),
            last_heard: BTreeMap::new(),
            last_leader_contact: 0,
            was_leader: false,
            down_proposed: BTreeMap::new(),
            local_sessions: BTreeSet::new(),
            pending_conf: BTreeMap::new(),
            snapshot_now: false,
            lost_log_logged_at: 0,
            snapshots_sent: BTreeMap::new(),
            out: Output::default(),
            poisoned: false,
            cfg,
        };
        if !core.cfg.witness {
            core.announce_incarnation();
        }
        Ok(core)
    }

    fn announce_incarnation(&mut self) {
        self.submit(Command::NodeRestart {
            node: self.cfg.id,
            incarnation: self.incarnation,
        });
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    pub fn is_witness(&self) -> bool {
        self.cfg.witness
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn table(&self) -> &LockTable {
        &self.table
    }

    pub fn log(&self) -> &LogCache {
        self.raw.store()
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader(&self) -> Option<NodeId> {
        match self.raw.raft.leader_id {
            0 => None,
            id => node_id(id),
        }
    }

    /// True once our current incarnation is known to the table and the table would accept
    /// a session from us (up, or down but fenced: opening a session brings the node back).
    pub fn is_ready_for_sessions(&self) -> bool {
        !self.cfg.witness
            && self
                .table
                .nodes()
                .get(&self.cfg.id)
                .is_some_and(|r| r.incarnation == self.incarnation && (r.up || r.fenced))
    }

    /// Queues a command for proposal; it is re-proposed until it is applied.
    pub fn submit(&mut self, cmd: Command) {
        if let Command::CloseSession { session } = &cmd {
            // Nothing of a closed session may be retried after the close.
            self.pending.retain(|k, _| match k {
                Key::Open(s) | Key::Req(s, _) => s != session,
                _ => true,
            });
        }
        let key = key_of(&cmd);
        if key != Key::Other {
            self.pending.insert(key, (cmd.clone(), self.now));
        }
        self.outbox.push(cmd);
    }

    /// Proposes a membership change, re-proposed until applied (raft-rs silently drops a
    /// conf change while an earlier one, or a new leader's first entry, is unapplied). The
    /// result is reported as `Effect::Done` to `session`.
    pub fn change_members(&mut self, session: SessionId, req: ReqId, change: MemberChange) {
        self.pending_conf.insert((session, req), (change, self.now));
        if self.conf_satisfied(change) {
            self.settle_conf_changes();
            return;
        }
        self.propose_conf(session, req, change);
    }

    fn propose_conf(&mut self, session: SessionId, req: ReqId, change: MemberChange) {
        let mut cc = ConfChange::default();
        let (ty, node) = match change {
            MemberChange::AddVoter(n) => (ConfChangeType::AddNode, n),
            MemberChange::AddLearner(n) => (ConfChangeType::AddLearnerNode, n),
            MemberChange::Remove(n) => (ConfChangeType::RemoveNode, n),
        };
        cc.set_change_type(ty);
        cc.node_id = raft_id(node);
        let Ok(context) = bincode::serde::encode_to_vec((session, req), bincode_cfg()) else {
            return;
        };
        // Dropped (no leader yet): the retry timer proposes it again.
        let _ = self.raw.propose_conf_change(context, cc);
    }

    /// One clock tick: raft timers, retries, failure detection, self-fencing.
    pub fn tick(&mut self) {
        self.now += 1;
        self.raw.tick();
        let leader = self.is_leader();
        if leader && !self.was_leader {
            // Fresh leader: give every peer a full timeout before judging it.
            for n in self.table.nodes().keys() {
                self.last_heard.insert(raft_id(*n), self.now);
            }
        }
        self.was_leader = leader;
        if leader {
            self.last_leader_contact = self.now;
            self.detect_dead_nodes();
            self.expire_snapshots();
        } else if let Some(l) = self.leader() {
            if self
                .now
                .is_multiple_of(self.cfg.heartbeat_ticks.max(1) as u64)
            {
                self.out.probes.push((l, Probe::Ping(self.now)));
            }
        }
        if !leader && self.now.saturating_sub(self.last_leader_contact) > self.cfg.self_fence_ticks
        {
            self.self_fence();
        }
        let retry: Vec<Command> = self
            .pending
            .values_mut()
            .filter(|(_, sent)| self.now.saturating_sub(*sent) >= self.cfg.retry_ticks)
            .map(|(cmd, sent)| {
                *sent = self.now;
                cmd.clone()
            })
            .collect();
        self.outbox.extend(retry);
        let conf: Vec<((SessionId, ReqId), MemberChange)> = self
            .pending_conf
            .iter_mut()
            .filter(|(_, (_, sent))| self.now.saturating_sub(*sent) >= self.cfg.retry_ticks)
            .map(|(k, (change, sent))| {
                *sent = self.now;
                (*k, *change)
            })
            .collect();
        self.settle_conf_changes();
        for ((session, req), change) in conf {
            if self.pending_conf.contains_key(&(session, req)) {
                self.propose_conf(session, req, change);
            }
        }
    }

    fn expire_snapshots(&mut self) {
        let timeout = 3 * self.cfg.retry_ticks;
        let expired: Vec<u64> = self
            .snapshots_sent
            .iter()
            .filter(|(_, sent)| self.now.saturating_sub(**sent) > timeout)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in expired {
            self.snapshots_sent.remove(&peer);
            let stuck = self
                .raw
                .raft
                .prs()
                .get(peer)
                .is_some_and(|p| p.state == ProgressState::Snapshot);
            if stuck {
                self.raw.report_snapshot(peer, SnapshotStatus::Failure);
            }
        }
    }

    fn is_member(&self, id: u64) -> bool {
        let cs = self.raw.store().conf_state();
        cs.voters.contains(&id) || cs.learners.contains(&id)
    }

    /// Declares down every node the table thinks is up that has been silent too long:
    /// members that stopped talking, and nodes removed from the membership (they hear no
    /// leader any more, so they fence themselves, and we stop listening to them).
    fn detect_dead_nodes(&mut self) {
        let voters = self.raw.store().conf_state().voters.len();
        let fenced = self.cfg.quorum_fencing && voters >= 3;
        let up: Vec<NodeId> = self
            .table
            .nodes()
            .iter()
            .filter(|(n, r)| r.up && **n != self.cfg.id)
            .map(|(n, _)| *n)
            .collect();
        for node in up {
            let silent = self
                .now
                .saturating_sub(*self.last_heard.get(&raft_id(node)).unwrap_or(&0));
            let recently = self
                .down_proposed
                .get(&node)
                .is_some_and(|t| self.now.saturating_sub(*t) < self.cfg.retry_ticks);
            if silent > self.cfg.node_dead_ticks && !recently {
                self.down_proposed.insert(node, self.now);
                self.outbox.push(Command::NodeDown { node, fenced });
            }
        }
    }

    /// Cut off from any leader for too long: the rest of the cluster may soon declare us
    /// down and hand our locks to recovery, so our clients must stop now. A new incarnation
    /// makes the table orphan the old sessions once we can talk to a leader again.
    fn self_fence(&mut self) {
        self.last_leader_contact = self.now;
        if self.cfg.witness || self.local_sessions.is_empty() {
            return;
        }
        self.end_local_sessions(EndReason::NodeDown);
    }

    fn end_local_sessions(&mut self, reason: EndReason) {
        for session in std::mem::take(&mut self.local_sessions) {
            self.out.effects.push(Effect::SessionEnded {
                session,
                reason: reason.clone(),
            });
        }
        let old = self.incarnation;
        self.pending.retain(|k, _| match k {
            Key::Open(s) | Key::Req(s, _) | Key::Close(s) => s.incarnation != old,
            Key::Restart(..) | Key::Other => false,
        });
        self.outbox.clear();
        self.incarnation = self.incarnation.wrapping_add(1);
        self.announce_incarnation();
    }

    /// A message from a peer (already authenticated by the transport).
    pub fn step(&mut self, msg: Message) {
        if msg.get_msg_type() == raft::prelude::MessageType::MsgHeartbeat
            && msg.commit > self.raw.raft.raft_log.last_index()
        {
            // The leader believes we acknowledged entries we do not have: this node lost its
            // log (wiped or restored) while still a member. raft-rs would panic here; refuse
            // instead, loudly. The operator must remove the node and add it back (--join).
            if self.lost_log_logged_at == 0
                || self.now >= self.lost_log_logged_at + 10 * self.cfg.retry_ticks
            {
                self.lost_log_logged_at = self.now.max(1);
                tracing::error!(
                    leader = msg.from,
                    commit = msg.commit,
                    last_index = self.raw.raft.raft_log.last_index(),
                    "this node's Raft log is missing entries it acknowledged; remove it and add it back"
                );
            }
            return;
        }
        if self.is_member(msg.from) {
            self.last_heard.insert(msg.from, self.now);
        }
        // Errors here are about stale or unknown peers; raft-rs already ignores them.
        let _ = self.raw.step(msg);
    }

    /// A liveness probe from a peer.
    pub fn on_probe(&mut self, from: NodeId, probe: Probe) {
        // A node removed from the membership gets no answers, so it fences itself.
        let member = self.is_member(raft_id(from));
        if member {
            self.last_heard.insert(raft_id(from), self.now);
        }
        match probe {
            Probe::Ping(seq) if self.is_leader() && member => {
                self.out.probes.push((from, Probe::Pong(seq)))
            }
            Probe::Ping(_) => {}
            Probe::Pong(sent_at) => {
                // The leader heard us no earlier than `sent_at`, our clock.
                if Some(from) == self.leader() && sent_at <= self.now {
                    self.last_leader_contact = self.last_leader_contact.max(sent_at);
                }
            }
        }
    }

    pub fn report_unreachable(&mut self, peer: NodeId) {
        self.raw.report_unreachable(raft_id(peer));
    }

    /// Proposes queued commands and handles every pending Ready. All messages are
    /// returned in `Output::messages`, after the durable writes.
    pub fn process(&mut self) -> Result<Output, CoreError> {
        let mut early = Vec::new();
        let mut out = self.process_with(&mut |m| early.push(m))?;
        early.append(&mut out.messages);
        out.messages = early;
        Ok(out)
    }

    /// Like `process`, but hands messages that need no persistence (step 1 of the Ready
    /// order: a leader's appends, heartbeats) to `send_now` before this node's own fsync,
    /// so followers persist in parallel with the leader instead of after it.
    pub fn process_with(&mut self, send_now: &mut dyn FnMut(Message)) -> Result<Output, CoreError> {
        if self.poisoned {
            return Err(CoreError::Poisoned);
        }
        self.flush_outbox();
        let result = (|| {
            while self.raw.has_ready() {
                self.on_ready(send_now)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // A failed fsync may have lost writes: never carry on as if it had not.
            self.poisoned = true;
            return Err(e);
        }
        Ok(std::mem::take(&mut self.out))
    }

    fn flush_outbox(&mut self) {
        let cmds = std::mem::take(&mut self.outbox);
        for chunk in cmds.chunks(MAX_COMMANDS_PER_ENTRY) {
            let batch = Batch {
                version: ENTRY_FORMAT_VERSION,
                cmds: chunk.to_vec(),
            };
            let Ok(data) = bincode::serde::encode_to_vec(&batch, bincode_cfg()) else {
                continue;
            };
            // Dropped proposals (no leader yet) stay in `pending` and are retried.
            let _ = self.raw.propose(Vec::new(), data);
        }
    }

    /// The Ready order documented in raft-rs (`src/lib.rs`, "Processing the Ready State").
    fn on_ready(&mut self, send_now: &mut dyn FnMut(Message)) -> Result<(), CoreError> {
        let mut rd = self.raw.ready();
        // 1. Messages that need no persistence go out first (leader appends in parallel).
        let messages = rd.take_messages();
        self.note_snapshots(&messages);
        for m in messages {
            send_now(m);
        }
        let mut wrote = false;
        // 2. A snapshot from the leader replaces our state.
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(snap)?;
            wrote = true;
        }
        // 3. Apply committed entries.
        let committed = rd.take_committed_entries();
        self.apply_entries(committed)?;
        // 4. Append new entries, 5. persist the hard state, with one sync for both.
        if !rd.entries().is_empty() {
            let rec = LogRecord::Entries(rd.take_entries());
            self.write(rec)?;
            wrote = true;
        }
        if let Some(hs) = rd.hs() {
            // A commit-index-only change needs no sync of its own (raft-rs `must_sync`):
            // a lost commit index is learned again from the leader.
            let rec = LogRecord::HardState(hs.clone());
            self.write(rec)?;
        }
        if wrote || rd.must_sync() {
            self.sink.sync()?;
        }
        // 6. Only now may messages that promise persisted state (votes, append acks) leave.
        self.out.messages.extend(rd.take_persisted_messages());
        // 7. Advance; the light ready carries the new commit index and more to apply.
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.store().hard_state().clone();
            hs.commit = commit;
            // Not synced on its own: a lost commit index is recomputed from the leader.
            self.write(LogRecord::HardState(hs))?;
        }
        let messages = light.take_messages();
        self.note_snapshots(&messages);
        self.out.messages.extend(messages);
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();
        self.maybe_snapshot()?;
        Ok(())
    }

    fn note_snapshots(&mut self, messages: &[Message]) {
        for m in messages {
            if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                self.snapshots_sent.insert(m.to, self.now);
            }
        }
    }

    fn write(&mut self, rec: LogRecord) -> Result<(), CoreError> {
        self.sink.write(&rec)?;
        self.raw.mut_store().apply(&rec)?;
        Ok(())
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), CoreError> {
        let table = decode_snapshot(&snap)?;
        let index = snap.get_metadata().index;
        self.write(LogRecord::Snapshot(snap))?;
        self.table = table;
        self.applied = index;
        self.last_snapshot_index = index;
        // We skipped log entries and with them effects for our sessions (opened, granted,
        // ended): their clients can no longer trust what they hold or wait for, so end them
        // like a restart would; the new incarnation orphans whatever they held.
        if !self.cfg.witness {
            self.end_local_sessions(EndReason::Restarted);
        }
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), CoreError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            self.applied = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry.data),
                EntryType::EntryConfChange => {
                    let Ok(cc) = ConfChange::parse_from_bytes(&entry.data) else {
                        continue;
                    };
                    let result = self.raw.apply_conf_change(&cc);
                    self.after_conf_change(result, &entry.context)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let Ok(cc) = ConfChangeV2::parse_from_bytes(&entry.data) else {
                        continue;
                    };
                    let result = self.raw.apply_conf_change(&cc);
                    self.after_conf_change(result, &entry.context)?;
                }
            }
        }
        Ok(())
    }

    fn apply_normal(&mut self, data: &[u8]) {
        if data.is_empty() {
            return; // a new leader's empty entry
        }
        // Every replica skips an undecodable entry alike, so they stay identical.
        let Ok((batch, _)) = bincode::serde::decode_from_slice::<Batch, _>(data, bincode_cfg())
        else {
            tracing::warn!("skipping an undecodable log entry");
            return;
        };
        if batch.version != ENTRY_FORMAT_VERSION {
            tracing::warn!(
                version = batch.version,
                "skipping a log entry of unknown format"
            );
            return;
        }
        for cmd in &batch.cmds {
            self.pending.remove(&key_of(cmd));
            let effects = self.table.apply(cmd);
            for fx in effects {
                self.route(fx);
            }
        }
    }

    fn route(&mut self, fx: Effect) {
        let s = fx.session();
        if s.node != self.cfg.id || s.incarnation != self.incarnation {
            return;
        }
        match &fx {
            Effect::SessionOpened { session } => {
                self.local_sessions.insert(*session);
            }
            Effect::SessionEnded { session, .. } => {
                self.local_sessions.remove(session);
            }
            _ => {}
        }
        self.out.effects.push(fx);
    }

    fn after_conf_change(
        &mut self,
        result: raft::Result<ConfState>,
        context: &[u8],
    ) -> Result<(), CoreError> {
        // Requested changes mean "make it so", not "do it once": a pending proposal whose
        // effect is in place is reported done and never re-proposed, so a late duplicate
        // cannot undo a later change (remove, add back, stale remove again). The context
        // (session, request) of the applied entry is therefore not needed to settle it.
        let _ = context;
        match result {
            Ok(cs) => {
                let me = raft_id(self.cfg.id);
                let member = cs.voters.contains(&me) || cs.learners.contains(&me);
                if !member && self.is_leader() {
                    // A leader that removed itself must stop leading at once: raft-rs keeps
                    // no progress for it and would panic on its next persisted entry.
                    let term = self.raw.raft.term;
                    self.raw.raft.become_follower(term, raft::INVALID_ID);
                }
                self.write(LogRecord::ConfState(cs))?;
                // A node added from now on catches up from our latest snapshot, and raft-rs
                // refuses a snapshot whose configuration does not list the node: take a
                // fresh one that carries the new configuration.
                self.snapshot_now = true;
            }
            // Applied twice after a retry, or invalid (removing a non-member): either way
            // the configuration is what the operator asked for or unchanged.
            Err(e) => tracing::warn!(error = %e, "membership change not applied"),
        }
        self.settle_conf_changes();
        Ok(())
    }

    fn conf_satisfied(&self, change: MemberChange) -> bool {
        let cs = self.raw.store().conf_state();
        match change {
            MemberChange::AddVoter(n) => cs.voters.contains(&raft_id(n)),
            MemberChange::AddLearner(n) => cs.learners.contains(&raft_id(n)),
            MemberChange::Remove(n) => {
                !cs.voters.contains(&raft_id(n)) && !cs.learners.contains(&raft_id(n))
            }
        }
    }

    /// Reports and forgets every pending membership change the configuration satisfies.
    fn settle_conf_changes(&mut self) {
        let done: Vec<(SessionId, ReqId)> = self
            .pending_conf
            .iter()
            .filter(|(_, (change, _))| self.conf_satisfied(*change))
            .map(|(k, _)| *k)
            .collect();
        for (session, req) in done {
            self.pending_conf.remove(&(session, req));
            self.route(Effect::Done { session, req });
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), CoreError> {
        let due = self.applied >= self.last_snapshot_index + self.cfg.snapshot_every_entries;
        if !(due || self.snapshot_now) || self.applied <= self.last_snapshot_index {
            return Ok(());
        }
        self.snapshot_now = false;
        let data = bincode::serde::encode_to_vec(
            SnapshotData {
                version: ENTRY_FORMAT_VERSION,
                table: self.table.clone(),
            },
            bincode_cfg(),
        )
        .map_err(|e| CoreError::Snapshot(e.to_string()))?;
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = raft::Storage::term(self.raw.store(), self.applied)?;
        meta.set_conf_state(self.raw.store().conf_state().clone());
        self.write(LogRecord::Snapshot(snap))?;
        self.sink.sync()?;
        self.sink.compact(self.raw.store())?;
        self.last_snapshot_index = self.applied;
        Ok(())
    }

    pub fn status(&self) -> CoreStatus {
        let cs = self.raw.store().conf_state();
        let ids = |v: &[u64]| v.iter().filter_map(|id| node_id(*id)).collect::<Vec<_>>();
        CoreStatus {
            id: self.cfg.id,
            role: format!("{:?}", self.raw.raft.state),
            leader: self.leader(),
            term: self.raw.raft.term,
            commit_index: self.raw.raft.raft_log.committed,
            applied_index: self.applied,
            last_index: self.raw.raft.raft_log.last_index(),
            voters: ids(&cs.voters),
            learners: ids(&cs.learners),
            sessions: self.table.session_count(),
            last_token: self.table.last_token().0,
            nodes: self
                .table
                .nodes()
                .iter()
                .map(|(n, r)| NodeHealth {
                    node: *n,
                    up: r.up,
                    fenced: r.fenced,
                    orphaned_locks: self.table.orphan_count(*n),
                })
                .collect(),
        }
    }
}
