//! What a resource does with a peer's messages: the connect-time decision, the full
//! resync (source and target side), generation updates, and applying replicated writes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_common::frame::{self, Channel};

use super::bitmap::DirtyBitmap;
use super::core::{
    finish_as_source, finish_as_target, inherit_bitmap_uuid, mint_after_rollback,
    mints_after_rollback, peer_generation, plan_connect, receive_uuids, resync_work,
    target_keeps_lineage, target_rolls_back, track_missing, Local, Plan,
};
use super::decide::{decide, Decision, Generation, SbSide};
use super::{Conn, Resource, SyncProgress};
use crate::proto::{AckMode, PeerMsg, PeerState};
use crate::state::{ConnState, DiskState, ReplState, Role};

/// Resync chunk size and how many chunks may await the target's ack.
const SYNC_CHUNK_BYTES: u64 = 1 << 20;
/// Resync chunk (and window) while application writes are active.
const BUSY_CHUNK_BYTES: u64 = 512 << 10;
/// Application writes within this window make the resync back off (see `resync_window`).
const APP_ACTIVE_WINDOW: Duration = Duration::from_millis(100);

/// Why a session must end.
#[derive(Debug)]
pub struct SessionEnd {
    pub reason: String,
    /// Stay disconnected until an operator runs `tandemadm connect`.
    pub standalone: bool,
}

impl SessionEnd {
    fn standalone(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            standalone: true,
        }
    }
    fn retry(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            standalone: false,
        }
    }
}

impl Resource {
    /// Handles a `State` message; the first one of a session triggers the decision.
    pub async fn on_peer_state(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        st: PeerState,
        first: bool,
    ) -> Result<(), SessionEnd> {
        self.update_peer(conn.peer, |p| p.state = Some(st.clone()));
        if self.is_tiebreaker(conn.peer) {
            // Its vote may count now: wake writers waiting for quorum.
            self.quorum_changed.notify_waiters();
        }
        if first {
            self.emit(
                "change",
                "connection",
                &format!("peer-node-id:{} role:{}", conn.peer, st.role),
            );
            let decided = self.handshake_decision(conn, &st).await;
            self.handshake_finished(conn);
            decided?;
        } else {
            self.emit(
                "change",
                "peer-device",
                &format!("peer-node-id:{} peer-disk:{}", conn.peer, st.disk),
            );
            self.reevaluate(conn).await;
        }
        // A tiebreaker may now vouch for a newer generation (no-op on disk nodes).
        self.tiebreaker_observe().await;
        Ok(())
    }

    async fn handshake_decision(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        st: &PeerState,
    ) -> Result<(), SessionEnd> {
        // A `Uuids` expected from a rolled-back peer on an earlier connection is moot.
        self.update_peer(conn.peer, |p| p.rolled_back_peer = false);
        let name = self
            .peer_view(conn.peer)
            .map(|p| p.name)
            .unwrap_or_default();
        // A tiebreaker has no volume, so no size to compare.
        let sized = !self.settings.diskless && !self.is_tiebreaker(conn.peer);
        if sized && st.usable_size_bytes != self.usable_bytes {
            return Err(SessionEnd::standalone(format!(
                "size mismatch: peer {name} has {} bytes, we have {}; recreate metadata with the same resource size",
                st.usable_size_bytes, self.usable_bytes
            )));
        }
        if st.protocol != self.settings.protocol
            || st.allow_two_primaries != self.settings.allow_two_primaries
        {
            return Err(SessionEnd::standalone(format!(
                "configuration mismatch with {name}: protocol/allow-two-primaries differ; use the same cluster.toml on every node"
            )));
        }
        if st.role == Role::Primary
            && self.role() == Role::Primary
            && !self.settings.allow_two_primaries
        {
            return Err(SessionEnd::standalone(format!(
                "both this node and {name} are Primary and allow-two-primaries is off"
            )));
        }
        let discard = self
            .update_peer(conn.peer, |p| std::mem::take(&mut p.discard_my_data))
            .unwrap_or(false);
        let local = Local {
            generation: self.generation_for(Some(conn.peer)),
            discard_my_data: discard,
            split_brain: SbSide {
                primary: self.role() == Role::Primary,
                changes_bytes: self.bitmap_dirty_bytes(conn.peer),
                node_id: self.settings.node_id.0,
                primary_at_loss: self.primary_at_loss(conn.peer),
            },
            policy: self.settings.sb_policy,
            own_crashed_extents: self.crashed_extents.lock().clone(),
        };
        let (plan, rule, split_brain) = plan_connect(&local, st, conn.peer);
        if !matches!(plan, Plan::Refuse { .. }) {
            // Connected past the split-brain check: the slot follows our role again.
            self.track_role_for(conn.peer)
                .await
                .map_err(|e| SessionEnd::retry(e.to_string()))?;
        }
        let (me, peer) = (local.generation, peer_generation(st));
        tracing::info!(resource = %self.name(), peer = %name, ?plan, %rule,
            local = format_args!("{:016X}:{:016X}", me.current, me.history[0]),
            remote = format_args!("{:016X}:{:016X}", peer.current, peer.history[0]),
            "uuid_compare decided by rule={rule}");
        if split_brain {
            self.run_split_brain_handler(&name);
            self.emit(
                "call",
                "helper",
                &format!("peer-node-id:{} helper:split-brain", conn.peer),
            );
        }
        match plan {
            Plan::Idle if rule == "equal-current" => {
                // Same generation, same data: nothing left to track between us.
                let peer = conn.peer;
                if self.bitmap_dirty_bytes(peer) > 0 || self.generation_for(Some(peer)).bitmap != 0
                {
                    if let Some((_, bm)) = self.bitmaps.lock().get_mut(&peer) {
                        bm.clear_all();
                    }
                    self.persist(|sb| finish_as_source(sb, peer))
                        .await
                        .map_err(|e| SessionEnd::retry(e.to_string()))?;
                    self.persist_whole_bitmap(peer)
                        .await
                        .map_err(|e| SessionEnd::retry(e.to_string()))?;
                }
                self.set_repl(conn.peer, ReplState::Established);
                // A join without a resync: our other peers learn of it (not awaited here —
                // this runs on the peer's reader, and two such joins could wait on each
                // other; the join that moves data, a resync, waits).
                let me = self.clone();
                tokio::spawn(async move {
                    me.confirm_join(peer).await;
                });
                Ok(())
            }
            Plan::Idle | Plan::AwaitSource => {
                let target = plan == Plan::AwaitSource;
                self.update_peer(conn.peer, |p| {
                    p.target_rule = target.then_some(rule);
                    p.awaiting_source = target;
                });
                if split_brain {
                    tracing::warn!(resource = %self.name(), peer = %name, policy = rule,
                        "Split-Brain detected, resolved automatically: our changes are discarded, resyncing from the peer");
                }
                self.set_repl(conn.peer, ReplState::Established);
                Ok(())
            }
            Plan::Source {
                use_bitmap,
                extents,
                peer_runs,
            } => {
                if split_brain {
                    tracing::warn!(resource = %self.name(), peer = %name, policy = rule,
                        "Split-Brain detected, resolved automatically: our data survives, the peer's changes are discarded");
                }
                self.update_peer(conn.peer, |p| {
                    p.rolled_back_peer = rule == "peer-crashed-primary";
                });
                self.start_resync(conn.clone(), use_bitmap, &extents, peer_runs.as_deref());
                Ok(())
            }
            Plan::Refuse {
                reason,
                split_brain: true,
            } => {
                tracing::error!(resource = %self.name(), peer = %name, %rule, %reason,
                    "Split-Brain detected, dropping connection! Resolve with `tandemadm disconnect`, `tandemadm secondary` and `tandemadm connect --discard-my-data` on the node whose changes are to be discarded");
                Err(SessionEnd::standalone("split brain detected"))
            }
            Plan::Refuse { reason, .. } => Err(SessionEnd::standalone(reason)),
        }
    }

    /// After a state change (ours or a peer's) an idle connection may now need a resync,
    /// e.g. after `primary --force` with Inconsistent peers.
    pub(super) async fn reevaluate(self: &Arc<Self>, conn: &Arc<Conn>) {
        let Some(view) = self.peer_view(conn.peer) else {
            return;
        };
        let Some(st) = view.state.as_ref() else {
            return;
        };
        if view.repl != ReplState::Established {
            return;
        }
        let (me, peer) = (self.generation_for(Some(conn.peer)), peer_generation(st));
        let (decision, rule) = decide(&me, &peer);
        if view.awaiting_source
            && matches!(
                decision,
                Decision::NoSync | Decision::SyncSource | Decision::BitmapSource
            )
        {
            // The resync we waited for is moot (another source brought us up to date).
            self.update_peer(conn.peer, |p| p.awaiting_source = false);
        }
        if decision == Decision::SyncSource && live_link_in_sync(&me, &peer) {
            // Both UpToDate, neither tracks a block for the other: every write reached both,
            // so the data is the same and only the generations differ — both of us minted
            // at once (a third node left) and the `Uuids` messages converge them. A full
            // resync here would make a mounted Primary Inconsistent for nothing.
            tracing::debug!(resource = %self.name(), peer = %view.name, %rule,
                "generations differ on an in-sync link: no resync");
            return;
        }
        // Only the source acts; the target switches to SyncTarget on SyncStart. A peer that
        // is already being synced by another node is left alone until it reports back.
        let bitmap = match decision {
            Decision::SyncSource => false,
            Decision::BitmapSource => true,
            _ => return,
        };
        if !st.sync_target {
            tracing::info!(resource = %self.name(), peer = %view.name, %rule, "state changed: starting resync");
            self.update_peer(conn.peer, |p| {
                p.rolled_back_peer = rule == "peer-crashed-primary";
            });
            let runs = st.dirty_runs.clone();
            self.start_resync(
                conn.clone(),
                bitmap,
                &[],
                if bitmap { runs.as_deref() } else { Some(&[]) },
            );
        }
    }

    pub(super) async fn reevaluate_all(self: &Arc<Self>) {
        for c in self.connections() {
            self.reevaluate(&c).await;
        }
    }

    /// Starts a resync to `conn`'s peer: our bitmap for it (`use_bitmap`) plus the given
    /// 4 MiB extents (a crashed Primary's activity log), or the whole volume when neither.
    pub(super) fn start_resync(
        self: &Arc<Self>,
        conn: Arc<Conn>,
        use_bitmap: bool,
        extents: &[u64],
        peer_runs: Option<&[(u64, u64)]>,
    ) {
        let work = {
            let bms = self.bitmaps.lock();
            let own = use_bitmap
                .then(|| bms.get(&conn.peer).map(|(_, bm)| bm))
                .flatten();
            let empty = DirtyBitmap::new(self.usable_bytes);
            let own = if use_bitmap {
                Some(own.unwrap_or(&empty))
            } else {
                None
            };
            resync_work(own, extents, peer_runs, self.usable_bytes)
        };
        let total = work.dirty_bytes();
        let full = !use_bitmap && extents.is_empty();
        self.set_repl(conn.peer, ReplState::SyncSource);
        self.update_peer(conn.peer, |p| {
            p.sync = Some(SyncProgress {
                total_bytes: total,
                done_bytes: 0,
                started: Instant::now(),
            })
        });
        tracing::info!(resource = %self.name(), peer = %conn.peer, bytes = total,
            mode = if use_bitmap { "bitmap" } else { "full" }, "resync started (SyncSource)");
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.run_resync(&conn, work, full).await {
                tracing::warn!(resource = %me.name(), peer = %conn.peer, error = %e,
                    "resync interrupted; it resumes on reconnect");
                conn.close();
            }
        });
    }

    /// One resync pass: streams the blocks set in `work` in runs of up to 1 MiB with a
    /// bounded window of unacked chunks. Application writes keep flowing; range locks
    /// order them with the chunks. Acked blocks leave our bitmap for the peer.
    async fn send_blocks(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        work: &DirtyBitmap,
        started: Instant,
        sent: &mut u64,
        acked: &mut u64,
    ) -> Result<(), String> {
        let mut window = std::collections::VecDeque::new();
        let mut next = work.next_run(0, self.resync_pace().1);
        while next.is_some() || !window.is_empty() {
            if conn.is_closed() || self.is_down() {
                return Err("connection closed".into());
            }
            let in_flight: u64 = window.iter().map(|(_, _, l)| *l).sum();
            let (target, chunk) = self.resync_pace();
            if let Some((offset, len)) = next.filter(|_| window.is_empty() || in_flight < target) {
                let seq = self.next_seq();
                let rx = conn.expect_ack(seq);
                {
                    let _range = self.ranges.lock(offset, len).await;
                    let data = self
                        .backing
                        .read_at(offset, len as usize)
                        .await
                        .map_err(|e| e.to_string())?;
                    let f = frame::encode(
                        Channel::Replication,
                        &PeerMsg::SyncData { seq, offset, data },
                    )
                    .map_err(|e| e.to_string())?;
                    if !conn.send_frame(Arc::new(f)).await {
                        return Err("connection closed".into());
                    }
                }
                self.stats
                    .resync_sent_bytes
                    .fetch_add(len, Ordering::Relaxed);
                window.push_back((rx, offset, len));
                *sent += len;
                next = work.next_run(offset + len, chunk);
                if let Some(rate) = self.settings.resync_rate_bytes_per_s {
                    let due = Duration::from_secs_f64(*sent as f64 / rate.max(1) as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                continue;
            }
            let (rx, offset, len) = window.pop_front().expect("window not empty");
            match rx.await {
                Ok(Ok(())) => *acked += len,
                Ok(Err(e)) => return Err(format!("peer failed a resync write: {e}")),
                Err(_) => return Err("connection closed".into()),
            }
            if let Some((_, bm)) = self.bitmaps.lock().get_mut(&conn.peer) {
                bm.clear_range(offset, len);
            }
            let done = *acked;
            self.update_peer(conn.peer, |p| {
                if let Some(s) = p.sync.as_mut() {
                    s.done_bytes = done;
                }
            });
        }
        Ok(())
    }

    /// SyncSource: sends `work`, has the join confirmed, sends what arrived for the peer
    /// meanwhile, then `SyncDone` with our view of the other peers.
    async fn run_resync(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        work: DirtyBitmap,
        full: bool,
    ) -> Result<(), String> {
        let total = work.dirty_bytes();
        if full {
            // The whole volume is news for the peer, durably and with a bitmap generation:
            // a full resync interrupted (link loss, a crash) resumes from our bitmap, as
            // the acked chunks clear it. Without this, writes tracked for the peer later
            // gave it a bitmap generation equal to its current one, and the next connect
            // chose a bitmap resync of only those bits: an invalidated node became
            // UpToDate with most of the volume never received.
            self.track_missing_peers(&[conn.peer])
                .await
                .map_err(|e| e.to_string())?;
            if let Some((_, bm)) = self.bitmaps.lock().get_mut(&conn.peer) {
                bm.set_all();
            }
            self.persist_whole_bitmap(conn.peer)
                .await
                .map_err(|e| e.to_string())?;
        }
        if !conn.send(&PeerMsg::SyncStart { total_bytes: total }).await {
            return Err("connection closed".into());
        }
        // Read no block before every write the target applied ahead of `SyncStart` (not
        // shadowed there, target_io.rs) is applied here too, or older resync data would
        // overwrite it. Its own writes: its answer to `Topology` follows them in its
        // stream. A third peer's writes it applied came before that answer, so they were
        // queued to us before that peer answers the `Topology` we send it next.
        let seq = self.next_seq();
        let rx = conn.expect_ack(seq);
        if !conn.send(&PeerMsg::Topology { seq }).await {
            return Err("connection closed".into());
        }
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(Ok(()))) => {}
            _ => return Err("the peer did not confirm the resync start in time".into()),
        }
        self.confirm_join(conn.peer).await;
        let started = Instant::now();
        let mut sent = 0u64;
        let mut acked = 0u64;
        self.send_blocks(conn, &work, started, &mut sent, &mut acked)
            .await?;
        // The peer is about to join our generation: our other peers confirm first, so a
        // writer among them mints before it writes past the peer (topology.rs).
        self.confirm_join(conn.peer).await;
        // Writes that reached us for the peer meanwhile (queued before the confirmations)
        // are in our bitmap for it: send those too, until a snapshot finds nothing. The
        // generation is read before the bitmap, so the peer never takes a generation
        // whose writes it lacks.
        let g = loop {
            if conn.is_closed() || self.is_down() {
                return Err("connection closed".into());
            }
            let g = self.generation();
            let late = self
                .bitmaps
                .lock()
                .get(&conn.peer)
                .map(|(_, bm)| bm.clone())
                .filter(|bm| bm.count_bits() > 0);
            match late {
                None => break g,
                Some(late) => {
                    let more = late.dirty_bytes();
                    self.update_peer(conn.peer, |p| {
                        if let Some(s) = p.sync.as_mut() {
                            s.total_bytes += more;
                        }
                    });
                    self.send_blocks(conn, &late, started, &mut sent, &mut acked)
                        .await?
                }
            }
        };
        let (crashed_primary, crashed_extents) = self.crashed_extents_after_syncing(conn.peer);
        let done = PeerMsg::SyncDone {
            current: g.current,
            history: g.history,
            third_peers: self.third_peer_views(conn.peer),
            crashed_primary,
            crashed_extents,
        };
        if !conn.send(&done).await {
            return Err("connection closed".into());
        }
        let peer = conn.peer;
        let still_behind =
            self.bitmap_dirty_bytes(peer) > 0 || self.generation().current != g.current;
        if still_behind {
            // Writes of a newer generation reached us after the snapshot: the peer is at
            // `g` now, and our bits for it count from there (a bitmap resync follows).
            self.persist(|sb| {
                for p in sb.peers.iter_mut().filter(|p| p.node_id == peer) {
                    p.bitmap_uuid = g.current;
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        } else {
            // The peer has everything: forget its bitmap generation.
            self.persist(|sb| finish_as_source(sb, peer))
                .await
                .map_err(|e| e.to_string())?;
        }
        self.persist_whole_bitmap(peer)
            .await
            .map_err(|e| e.to_string())?;
        self.conn_changed.store(true, Ordering::Release);
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        tracing::info!(resource = %self.name(), %peer, bytes = total,
            mib_per_s = format_args!("{:.1}", total as f64 / secs / 1048576.0), "resync done (SyncSource)");
        self.update_peer(peer, |p| p.sync = None);
        self.set_repl(peer, ReplState::Established);
        // A crashed Primary whose hot extents every disk peer now has is whole again
        // (tiebreakers store no data, so they never need the extents).
        let all_synced = self
            .inner
            .lock()
            .peers
            .iter()
            .filter(|(id, _)| !self.is_tiebreaker(**id))
            .all(|(_, p)| p.conn.is_some() && p.repl == ReplState::Established);
        if all_synced && self.crashed_extents.lock().take().is_some() {
            self.persist(|sb| {
                sb.flags &= !(crate::meta::format::FLAG_CRASHED_PRIMARY
                    | crate::meta::format::FLAG_CRASHED_HERE)
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        conn.send(&PeerMsg::State(self.local_state(peer))).await;
        Ok(())
    }

    /// Messages that must apply in stream order (called by the session's apply task).
    pub async fn apply_in_order(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        msg: PeerMsg,
    ) -> Result<(), SessionEnd> {
        if self.settings.diskless {
            return self.tiebreaker_apply(conn, msg).await;
        }
        match msg {
            PeerMsg::Write {
                seq,
                offset,
                data,
                fua,
                ack,
                missing,
            } => {
                let len = data.len() as u64;
                self.apply_app_write(conn, seq, offset, len, fua, ack, &missing, Some(data))
                    .await
            }
            PeerMsg::Zero {
                seq,
                offset,
                len,
                fua,
                ack,
                missing,
            } => {
                self.apply_app_write(conn, seq, offset, len, fua, ack, &missing, None)
                    .await
            }
            PeerMsg::Flush { seq } => {
                let r = self.backing.sync().await;
                self.ack_result(conn, seq, AckMode::Write, r).await
            }
            PeerMsg::SyncStart { total_bytes } => {
                tracing::info!(resource = %self.name(), peer = %conn.peer, total_bytes, "resync started (SyncTarget)");
                // A resync the source started on its own (`reevaluate`: our handshake said
                // Idle) left no rule here; decide it now, before we turn Inconsistent.
                // Unknown, `SyncDone` must assume our data was replaced and marks all it
                // received for our other peers: after an initial full sync that was the
                // whole volume, and a needless full resync of an in-sync peer (a Primary,
                // whose writes then failed while it was SyncTarget).
                if let Some(st) = self
                    .peer_view(conn.peer)
                    .filter(|p| p.target_rule.is_none())
                    .and_then(|p| p.state)
                {
                    let (decision, rule) =
                        decide(&self.generation_for(Some(conn.peer)), &peer_generation(&st));
                    if matches!(decision, Decision::SyncTarget | Decision::BitmapTarget) {
                        self.update_peer(conn.peer, |p| p.target_rule = Some(rule));
                    }
                }
                // One source at a time: the shadow, received and replaced sets are ours
                // alone, and a second SyncStart would reset them under the first resync
                // (two nodes can both find us behind at once). This source retries later.
                let other_source = self
                    .inner
                    .lock()
                    .peers
                    .iter()
                    .any(|(id, p)| *id != conn.peer && p.repl == ReplState::SyncTarget);
                if other_source {
                    return Err(SessionEnd::retry(
                        "already SyncTarget of another peer; resync from this one later",
                    ));
                }
                // Shadow and SyncTarget first, Inconsistent last: an application write
                // or read never finds the disk Inconsistent without a source to serve it
                // through (target_io.rs); until then it runs as on an UpToDate disk, and
                // its local write is shadowed already.
                *self.sync_shadow.lock() = Some(DirtyBitmap::new(self.usable_bytes));
                self.sync_overlays.lock().clear();
                *self.sync_received.lock() = Some(DirtyBitmap::new(self.usable_bytes));
                *self.sync_replaced.lock() = Some(DirtyBitmap::new(self.usable_bytes));
                self.update_peer(conn.peer, |p| {
                    p.awaiting_source = false;
                    p.sync = Some(SyncProgress {
                        total_bytes,
                        done_bytes: 0,
                        started: Instant::now(),
                    })
                });
                self.set_repl(conn.peer, ReplState::SyncTarget);
                self.persist(|sb| sb.disk_state = DiskState::Inconsistent)
                    .await
                    .map_err(|e| SessionEnd::retry(e.to_string()))?;
                self.set_disk(DiskState::Inconsistent);
                self.broadcast_state().await;
                Ok(())
            }
            PeerMsg::SyncData { seq, offset, data } => {
                let len = data.len() as u64;
                if offset
                    .checked_add(len)
                    .is_none_or(|e| e > self.usable_bytes)
                {
                    return Err(SessionEnd::retry(
                        "resync data beyond the end of the volume",
                    ));
                }
                // Per chunk: read the rule without cloning the whole peer view.
                let rule = self.update_peer(conn.peer, |p| p.target_rule).flatten();
                let note = !rule.is_none_or(target_rolls_back);
                let r = self.write_resync_chunk(conn.peer, offset, data, note).await;
                self.stats
                    .resync_received_bytes
                    .fetch_add(len, Ordering::Relaxed);
                self.update_peer(conn.peer, |p| {
                    if let Some(s) = p.sync.as_mut() {
                        s.done_bytes = (offset + len).max(s.done_bytes);
                    }
                });
                self.ack_result(conn, seq, AckMode::Write, r).await
            }
            PeerMsg::SyncDone {
                current,
                history,
                third_peers,
                crashed_primary,
                crashed_extents,
            } => {
                self.backing
                    .sync()
                    .await
                    .map_err(|e| SessionEnd::retry(e.to_string()))?;
                // What we received replaced data of ours a third peer may have got from us
                // (a crashed Primary's unacknowledged writes, a discarded branch): news
                // for our other peers. A plain catch-up inherits the source's view instead.
                let received = self.sync_received.lock().take();
                // Nothing written here: our data is what it was, whatever the rule.
                let nothing_received = received.as_ref().is_some_and(|r| r.count_bits() == 0);
                let replaced = self.sync_replaced.lock().take();
                let rule = self.peer_view(conn.peer).and_then(|p| p.target_rule);
                // Read before `finish_as_target` clears the crash flags.
                let flags_before = self.sb_cache.lock().flags;
                let disk_peers: Vec<tandem_common::NodeId> = self
                    .settings
                    .peers
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| !self.is_tiebreaker(*id))
                    .collect();
                let others: Vec<tandem_common::NodeId> = disk_peers
                    .iter()
                    .copied()
                    .filter(|id| *id != conn.peer)
                    .collect();
                let rolls_back = rule.is_none_or(target_rolls_back);
                if let (Some(received), true) = (received, rolls_back) {
                    self.mark_blocks_for(&others, &received)
                        .await
                        .map_err(|e| SessionEnd::retry(e.to_string()))?;
                }
                // A plain catch-up replaced blocks we held bits for against the source
                // (doubt about a crashed writer's unacknowledged write, which we may have
                // passed on): news for our other peers too, whatever the source's view of
                // them says. Bits now; their bitmap generation with the superblock below.
                let replaced = replaced.filter(|r| !rolls_back && r.count_bits() > 0);
                if let Some(replaced) = &replaced {
                    self.set_and_persist_bits(&others, replaced)
                        .await
                        .map_err(|e| SessionEnd::retry(e.to_string()))?;
                    tracing::info!(resource = %self.name(), peer = %conn.peer, blocks = replaced.count_bits(),
                        "resync replaced blocks we had changed: marked for our other peers");
                }
                // A crashed source's hot extents came with their doubt (see proto.rs); our
                // activity log keeps them across a restart.
                let tainted = crashed_primary;
                // A Primary (serving as target) may have writes in flight whose extents
                // must stay in its activity log; it is cleared at its demotion.
                if self.role() != Role::Primary {
                    self.al_clear()
                        .await
                        .map_err(|e| SessionEnd::retry(e.to_string()))?;
                }
                if tainted {
                    for e in crashed_extents.iter().flatten() {
                        drop(
                            self.al_begin(e * super::al::EXTENT_BYTES, 1)
                                .await
                                .map_err(|e| SessionEnd::retry(e.to_string()))?,
                        );
                    }
                }
                *self.crashed_extents.lock() = if tainted { crashed_extents } else { None };
                let peer = conn.peer;
                // Unknown rule (none recorded): assume our data was replaced, the safe side.
                let keeps_lineage = self
                    .update_peer(peer, |p| p.target_rule.take())
                    .flatten()
                    .is_some_and(target_keeps_lineage)
                    || nothing_received;
                // We hold the source's data now: its bitmaps for our other peers become ours
                // (added to what we tracked), bits on disk before the superblock says so.
                let inherited = self.inherit_third_peers(&third_peers);
                for p in &inherited {
                    self.persist_whole_bitmap(*p)
                        .await
                        .map_err(|e| SessionEnd::retry(e.to_string()))?;
                }
                // A crashed Primary rolled back by its survivor mints in the same superblock
                // write that clears its crash flags (`mint_after_rollback`): a crash in
                // between must not leave it unflagged and unminted.
                let mints = rule.is_some_and(|r| mints_after_rollback(r, flags_before));
                let fresh = rand::random::<u64>() | 1;
                let mut minted = false;
                self.persist(|sb| {
                    finish_as_target(sb, peer, current, history, keeps_lineage);
                    for v in third_peers.iter().filter(|v| inherited.contains(&v.node)) {
                        inherit_bitmap_uuid(sb, v);
                    }
                    if tainted {
                        sb.flags |= crate::meta::format::FLAG_CRASHED_PRIMARY;
                    }
                    if replaced.is_some() {
                        track_missing(sb, &others);
                    }
                    if mints {
                        minted = mint_after_rollback(sb, &disk_peers, peer, fresh);
                    }
                })
                .await
                .map_err(|e| SessionEnd::retry(e.to_string()))?;
                tracing::info!(resource = %self.name(), peer = %conn.peer, "resync done (SyncTarget): UpToDate");
                // UpToDate from this source: no other peer's pending resync is awaited now
                // (one that still finds us behind starts it and says so with SyncStart).
                for p in self.inner.lock().peers.values_mut() {
                    p.awaiting_source = false;
                }
                // Whatever we had changed that this peer lacked is overwritten now.
                if let Some((_, bm)) = self.bitmaps.lock().get_mut(&peer) {
                    bm.clear_all();
                }
                self.persist_whole_bitmap(peer)
                    .await
                    .map_err(|e| SessionEnd::retry(e.to_string()))?;
                // UpToDate before the shadow goes (the reverse of `SyncStart`).
                self.set_disk(DiskState::UpToDate);
                *self.sync_shadow.lock() = None;
                self.sync_overlays.lock().clear();
                self.update_peer(conn.peer, |p| p.sync = None);
                self.set_repl(conn.peer, ReplState::Established);
                // We joined the source's generation: our other peers confirm it too.
                self.conn_changed.store(true, Ordering::Release);
                self.confirm_join(conn.peer).await;
                if minted {
                    self.announce_rollback_mint(conn, disk_peers).await;
                }
                self.broadcast_state().await;
                if minted {
                    // We are newer than every third peer now: resync the connected ones.
                    // Not the source: it adopts our generation from `Uuids` (re-deciding
                    // with it first would start an empty resync that turns it Inconsistent).
                    for c in self.connections() {
                        if c.peer != conn.peer {
                            self.reevaluate(&c).await;
                        }
                    }
                }
                Ok(())
            }
            PeerMsg::Uuids {
                current,
                history,
                missing,
            } => {
                // Not `current > ours`: a peer that adopted our generation and minted on
                // top of it may pick a smaller number, and ignoring it left two connected
                // Primaries on different generations (a rejoining node then full-synced
                // onto one of them). `adopt_uuids` decides by ancestry first.
                let mine: Vec<tandem_common::NodeId> = missing
                    .iter()
                    .copied()
                    .filter(|p| *p != self.settings.node_id)
                    .collect();
                let in_sync = self
                    .peer_view(conn.peer)
                    .is_some_and(|p| p.repl == ReplState::Established);
                let after_rollback = self
                    .update_peer(conn.peer, |p| std::mem::take(&mut p.rolled_back_peer))
                    .unwrap_or(false);
                let mut probe = self.sb_cache.lock().clone();
                if receive_uuids(&mut probe, &mine, in_sync, current, history) {
                    self.persist(|sb| {
                        receive_uuids(sb, &mine, in_sync, current, history);
                    })
                    .await
                    .map_err(|e| SessionEnd::retry(e.to_string()))?;
                    tracing::info!(resource = %self.name(), peer = %conn.peer,
                        current = format_args!("{:016X}", self.generation().current),
                        "peer minted a new current generation; tracking {mine:?}");
                    // Adopted a rolled-back Primary's generation (`mint_after_rollback`):
                    // our connected peers that stayed at the old one may be behind us now;
                    // they re-decide against our new State, and we act as the source where
                    // we are newer. Not after a writer's mint: under a lasting partial cut
                    // that would mean a resync through us after every write.
                    if after_rollback && self.generation().current == current {
                        self.broadcast_state().await;
                        self.reevaluate_all().await;
                    }
                }
                Ok(())
            }
            PeerMsg::NewCurrentUuid { uuid } => {
                let g = self.generation();
                if g.current == 0 && self.disk() == DiskState::Inconsistent {
                    self.persist(|sb| {
                        sb.current_uuid = uuid;
                        sb.disk_state = DiskState::UpToDate;
                    })
                    .await
                    .map_err(|e| SessionEnd::retry(e.to_string()))?;
                    self.set_disk(DiskState::UpToDate);
                    self.set_repl(conn.peer, ReplState::Established);
                    self.broadcast_state().await;
                    Ok(())
                } else {
                    Err(SessionEnd::standalone(
                        "peer sent new-current-uuid --clear-bitmap but this disk already has data",
                    ))
                }
            }
            PeerMsg::ReadRequest { seq, offset, len } => {
                self.answer_read(conn, seq, offset, len).await;
                Ok(())
            }
            PeerMsg::VerifyRequest { seq, offset, len } => self
                .answer_verify(conn, seq, offset, len)
                .await
                .map_err(SessionEnd::retry),
            PeerMsg::Topology { seq } => {
                self.on_topology(conn, seq);
                Ok(())
            }
            // Applied in stream order: the writes the peer sent before it are tracked.
            PeerMsg::TopologyAck { seq } => {
                conn.complete(seq, Ok(()));
                Ok(())
            }
            PeerMsg::PeerAck { seq, lost } => self
                .on_peer_ack(conn.peer, seq, &lost)
                .await
                .map_err(|e| SessionEnd::retry(e.to_string())),
            other => Err(SessionEnd::retry(format!(
                "unexpected {} in the ordered stream",
                other.kind()
            ))),
        }
    }

    /// A peer's application write (`data`) or zeroing (`None`), in stream order: conflict
    /// check, resync shadow, tracking for the writer's missing peers, disk, ack.
    async fn apply_app_write(
        &self,
        conn: &Conn,
        seq: u64,
        offset: u64,
        len: u64,
        fua: bool,
        ack: AckMode,
        missing: &[tandem_common::NodeId],
        data: Option<Vec<u8>>,
    ) -> Result<(), SessionEnd> {
        self.check_conflict(conn, offset, len)?;
        // A Primary that is our SyncTarget writes: the resync we send it keeps less in
        // flight, as for our own writes, so its flushes wait for less resync data (they
        // waited 25 ms for the full-speed stream). Not for other writers: their flushes
        // do not wait for that stream, and it would only slow the resync down.
        let from_our_target = self
            .inner
            .lock()
            .peers
            .get(&conn.peer)
            .is_some_and(|p| p.repl == ReplState::SyncSource);
        if from_our_target {
            *self.last_app_write.lock() = Some(Instant::now());
        }
        self.record_received_write(missing, offset, len)
            .await
            .map_err(|e| SessionEnd::retry(e.to_string()))?;
        if ack != AckMode::None {
            self.note_unconfirmed(conn.peer, seq, offset, len, missing);
        }
        let r = async {
            self.write_app_data_locally(offset, len, data).await?;
            if fua {
                self.backing.sync().await?;
            }
            Ok::<_, crate::backing::BackingError>(())
        }
        .await;
        self.ack_result(conn, seq, ack, r).await
    }

    /// Dual-primary: a peer's write overlapping one of our own in-flight writes means the
    /// layer above did not lock. DRBD drops the connection; so do we (the copies are then
    /// resynced, never silently different).
    fn check_conflict(&self, conn: &Conn, offset: u64, len: u64) -> Result<(), SessionEnd> {
        if self.inflight.overlaps(offset, len) {
            let n = self.stats.conflicts.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(resource = %self.name(), peer = %conn.peer, offset, len, total = n,
                "Concurrent writes detected: local and remote writes overlap; dropping the connection");
            return Err(SessionEnd::retry("concurrent writes detected"));
        }
        Ok(())
    }

    async fn ack_result(
        &self,
        conn: &Conn,
        seq: u64,
        ack: AckMode,
        r: Result<(), crate::backing::BackingError>,
    ) -> Result<(), SessionEnd> {
        match r {
            Ok(()) => {
                if ack == AckMode::Write {
                    conn.send(&PeerMsg::WriteAck { seq }).await;
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(resource = %self.name(), error = %e, "local disk failed a replicated write");
                conn.send(&PeerMsg::NegAck {
                    seq,
                    reason: e.to_string(),
                })
                .await;
                // Detached: stay connected (the peer now tracks what we miss).
                if self.on_disk_error(&e).await {
                    Ok(())
                } else {
                    Err(SessionEnd::retry(format!("local disk error: {e}")))
                }
            }
        }
    }

    /// A session ended: for protocols A and B a Primary may have queued writes the peer
    /// never got, so mint a new generation right away (protocol C does it per write).
    pub async fn after_session(self: &Arc<Self>, conn: &Arc<Conn>, end: &SessionEnd) {
        if end.standalone {
            self.update_peer(conn.peer, |p| p.standalone = true);
        }
        let next = if end.standalone {
            ConnState::StandAlone
        } else {
            ConnState::Connecting
        };
        // Before our new state goes out, and while the connection is still registered (a
        // new one to this peer waits for this session to end, handshake.rs, and so sends
        // a `State` with these bits): the blocks its unconfirmed writes touched, and for
        // protocols A and B everything.
        let marked = self.unconfirmed_lost(conn.peer).await;
        if self.role() == Role::Primary
            && self.settings.protocol != tandem_common::config::Protocol::C
            && conn.writes_sent.load(Ordering::Relaxed) > 0
        {
            if let Err(e) = self.mark_all_for(conn.peer).await {
                tracing::error!(resource = %self.name(), error = %e, "cannot record the peer's missed writes");
            }
        }
        self.on_disconnected(conn, &end.reason, next).await;
        if marked {
            self.reevaluate_all().await;
        }
    }
}

impl Resource {
    /// Resync bytes kept in flight and the size of one chunk: the fill target in 1 MiB
    /// chunks, or a single small chunk while application writes are active — DRBD's
    /// dynamic controller in miniature. An application flush waits for the resync data
    /// queued ahead of its write on the link and must write back the resync data dirty on
    /// both disks, so the less resync is in flight the sooner it returns; measured here
    /// the resync rate hardly changes (`./tandem bench replicator --resync-only`).
    fn resync_pace(&self) -> (u64, u64) {
        let busy = self
            .last_app_write
            .lock()
            .is_some_and(|t| t.elapsed() < APP_ACTIVE_WINDOW);
        if busy {
            (BUSY_CHUNK_BYTES, BUSY_CHUNK_BYTES)
        } else {
            (self.settings.resync_fill_target_bytes, SYNC_CHUNK_BYTES)
        }
    }

    /// Runs the configured split-brain handler (not waited for; its exit is logged).
    fn run_split_brain_handler(&self, peer: &str) {
        let Some(cmd) = self.settings.split_brain_handler.clone() else {
            return;
        };
        let resource = self.name().to_string();
        let peer = peer.to_string();
        tokio::spawn(async move {
            let out = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&cmd)
                .env("TANDEM_RESOURCE", &resource)
                .env("TANDEM_PEER", &peer)
                .status()
                .await;
            match out {
                Ok(s) => {
                    tracing::info!(%resource, handler = %cmd, status = %s, "split-brain handler finished")
                }
                Err(e) => {
                    tracing::error!(%resource, handler = %cmd, error = %e, "cannot run split-brain handler")
                }
            }
        });
    }

    /// As SyncTarget of `source`: before `data` overwrites `offset..`, note each 4 KiB
    /// block we hold a bit for against the source whose content changes (`sync_replaced`).
    /// Reads only those blocks — bits at a catch-up are rare (a crashed writer's doubt) —
    /// and skips blocks an application write already made newer (`sync_shadow`). A block
    /// that cannot be read counts as changed.
    pub(super) async fn note_replaced(
        &self,
        source: tandem_common::NodeId,
        offset: u64,
        data: &[u8],
    ) {
        let blocks: Vec<u64> = {
            let bms = self.bitmaps.lock();
            let Some((_, own)) = bms.get(&source) else {
                return;
            };
            let shadow = self.sync_shadow.lock();
            (0..data.len().div_ceil(BLOCK) as u64)
                .map(|i| offset + i * BLOCK as u64)
                .filter(|&o| own.is_set(o) && !shadow.as_ref().is_some_and(|s| s.is_set(o)))
                .collect()
        };
        for o in blocks {
            let at = (o - offset) as usize;
            let new = &data[at..(at + BLOCK).min(data.len())];
            let changed = match self.backing.read_at(o, new.len()).await {
                Ok(old) => old != new,
                Err(_) => true,
            };
            if changed {
                if let Some(r) = self.sync_replaced.lock().as_mut() {
                    r.set_range(o, new.len() as u64);
                }
            }
        }
    }
}

const BLOCK: usize = super::bitmap::BLOCK_BYTES as usize;

/// An Established link whose two sides hold the same data: both UpToDate, neither a
/// crashed Primary (whose hot extents may differ), and neither has a bitmap generation or
/// a dirty bit for the other.
fn live_link_in_sync(me: &Generation, peer: &Generation) -> bool {
    use crate::state::DiskState;
    me.disk == DiskState::UpToDate
        && peer.disk == DiskState::UpToDate
        && !me.crashed
        && !peer.crashed
        && me.bitmap == 0
        && !me.dirty
        && peer.bitmap == 0
        && !peer.dirty
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DiskState;

    fn gen(current: u64, history: [u64; 2]) -> Generation {
        super::super::decide::tests::g(DiskState::UpToDate, current, history)
    }

    /// Two connected Primaries lose a third node at once: B adopts A's new generation X
    /// and mints Y on top, while A still shows X. `decide` alone says "B is newer, full
    /// resync"; on a live link where neither tracks a block for the other that resync
    /// must not start (it made a mounted Primary Inconsistent).
    #[test]
    fn concurrent_mints_on_an_in_sync_link_start_no_resync() {
        let (parent, x, y) = (0x11, 0x22, 0x33);
        let a = gen(x, [parent, 0]);
        let b = gen(y, [x, parent]);
        assert_eq!(decide(&b, &a).0, Decision::SyncSource);
        assert!(live_link_in_sync(&b, &a));
        // Any tracked block, bitmap generation or crash flag means real differences.
        assert!(!live_link_in_sync(&Generation { dirty: true, ..b }, &a));
        assert!(!live_link_in_sync(&b, &Generation { bitmap: y, ..a }));
        assert!(!live_link_in_sync(&b, &Generation { crashed: true, ..a }));
        assert!(!live_link_in_sync(
            &b,
            &Generation {
                disk: DiskState::Outdated,
                ..a
            }
        ));
    }
}
