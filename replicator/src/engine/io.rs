//! The application I/O path of a resource (what the NBD export calls).
//!
//! A write on a Primary: take the byte range, mint a new generation first if some peer is
//! missing (so a later reconnect knows that peer is behind), queue the write to every
//! replicating peer, write locally, then wait for the acks the protocol asks for:
//! none (A), received (B) or written (C). A peer that drops mid-request does not fail the
//! write — it is behind now, and the generation says so before the write is acknowledged.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tandem_common::frame::{self, Channel};
use tandem_common::NodeId;

use super::{Conn, EngineError, Resource};
use crate::backing::BackingError;
use crate::proto::{AckMode, PeerMsg, MAX_DATA_BYTES};
use crate::state::{DiskState, ReplState, Role};

/// Errors the NBD layer maps to NBD error codes.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("writes need the Primary role (this node is Secondary)")]
    NotPrimary,
    #[error("local disk is {0}; I/O needs UpToDate data")]
    NotUpToDate(DiskState),
    #[error("request {offset}+{len} beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request too large ({0} bytes)")]
    TooLarge(u64),
    #[error("resource is down")]
    Down,
    #[error("the resync source was lost before it acknowledged the write; this node's disk is Inconsistent, so the write is not on an UpToDate copy")]
    SourceLost,
    #[error(
        "no quorum: this node and its connected peers are not a majority (on-no-quorum = io-error)"
    )]
    NoQuorum,
    #[error("local disk error: {0}")]
    Disk(#[from] BackingError),
    #[error("{0}")]
    Engine(#[from] EngineError),
}

impl Resource {
    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.usable_bytes => Ok(()),
            _ => Err(IoError::OutOfRange {
                offset,
                len,
                size: self.usable_bytes,
            }),
        }
    }

    /// Whether this node may write now: UpToDate, detached with an UpToDate peer, or a
    /// SyncTarget with its source connected (target_io.rs; `replicate` decides again under
    /// the topology gate).
    async fn check_writable(&self) -> Result<(), IoError> {
        if self.is_down() {
            return Err(IoError::Down);
        }
        {
            let inner = self.inner.lock();
            if inner.role != Role::Primary {
                return Err(IoError::NotPrimary);
            }
            let diskless_ok = self.is_detached()
                && inner.peers.values().any(|p| {
                    p.conn.is_some()
                        && p.state
                            .as_ref()
                            .is_some_and(|s| s.disk == DiskState::UpToDate)
                });
            if diskless_ok {
                return Ok(());
            }
        }
        self.data_path()
            .await
            .map(drop)
            .map_err(IoError::NotUpToDate)
    }

    /// Peers that must receive application writes now (connected and either in sync,
    /// being synced from us — a SyncTarget gets new writes too, the resync fills the
    /// rest — or syncing us: our source must hold every write we acknowledge as target),
    /// and the peers that will miss them.
    fn replication_targets(&self) -> (Vec<Arc<Conn>>, Vec<NodeId>) {
        let inner = self.inner.lock();
        let mut targets = Vec::new();
        let mut missing = Vec::new();
        for (id, p) in &inner.peers {
            // Tiebreakers hold no data: they neither get writes nor miss them.
            if self.is_tiebreaker(*id) {
                continue;
            }
            match (&p.conn, p.repl) {
                (
                    Some(c),
                    ReplState::Established
                    | ReplState::SyncSource
                    | ReplState::SyncTarget
                    | ReplState::VerifyS,
                ) => targets.push(c.clone()),
                _ => missing.push(*id),
            }
        }
        (targets, missing)
    }

    /// Quorum gate for writes and flushes: fail (io-error) or wait (suspend-io). With
    /// io-error, a quorum that only waits for a tiebreaker's confirmation is waited for.
    async fn wait_for_quorum(&self) -> Result<(), IoError> {
        loop {
            let notified = self.quorum_changed.notified();
            if self.has_quorum() {
                return Ok(());
            }
            if self.is_down() {
                return Err(IoError::Down);
            }
            match self.settings.on_no_quorum {
                tandem_common::config::OnNoQuorum::IoError => {
                    return match self.await_quorum(None).await {
                        true => Ok(()),
                        false => Err(IoError::NoQuorum),
                    };
                }
                tandem_common::config::OnNoQuorum::SuspendIo => {
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), notified).await;
                }
            }
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        if self.is_down() {
            return Err(IoError::Down);
        }
        self.check_range(offset, len as u64)?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .read_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        if self.is_detached() {
            return self.remote_read(offset, len).await;
        }
        if let Some(source) = self.data_path().await.map_err(IoError::NotUpToDate)? {
            return self.target_read(&source, offset, len).await;
        }
        match self.backing.read_at(offset, len as usize).await {
            Ok(d) => Ok(d),
            Err(e) => {
                if self.on_disk_error(&e).await {
                    self.remote_read(offset, len).await
                } else {
                    Err(e.into())
                }
            }
        }
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        if data.len() > MAX_DATA_BYTES {
            return Err(IoError::TooLarge(len));
        }
        self.check_range(offset, len)?;
        self.check_writable().await?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.written_bytes.fetch_add(len, Ordering::Relaxed);
        self.replicate(offset, len, fua, Some(data)).await
    }

    /// TRIM and WRITE_ZEROES: both write zeroes on every copy, so copies stay identical.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        self.check_range(offset, len)?;
        self.check_writable().await?;
        self.replicate(offset, len, fua, None).await
    }

    /// Replicates a write (`data`) or a zeroing (`None`) of `[offset, offset+len)`. As
    /// SyncTarget, only the source's copy makes it durable (target_io.rs).
    async fn replicate(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        data: Option<Vec<u8>>,
    ) -> Result<(), IoError> {
        self.wait_for_quorum().await?;
        *self.last_app_write.lock() = Some(std::time::Instant::now());
        let detached = self.is_detached();
        let _al = if detached {
            None
        } else {
            Some(self.al_begin(offset, len).await?)
        };
        // Most waits for a handshake happen here, before the write shows in `inflight`
        // (a dual-primary peer's overlapping write would count as a conflict meanwhile).
        self.await_handshakes().await;
        // In-flight registry for dual-primary conflict detection (held until acked).
        let _inflight = self.inflight.register(offset, len);
        // Target mode is decided under the gate: a write that began UpToDate may find a
        // resync started (and one that began as target may find it done), or the disk
        // just invalidated with the source's `SyncStart` on its way. That one is waited
        // for without the range and the gate (neighbours' join confirmations wait for
        // the gate), then everything is taken and decided again.
        let (range, gate, source) = loop {
            let range = self.ranges.lock(offset, len).await;
            // From the generation check until queued to every peer (see topology.rs).
            let gate = self.topology_gate.read().await;
            if detached {
                break (range, gate, None);
            }
            // A peer is deciding on the State we sent it: writing now would change what
            // it decides about (handshake.rs).
            if self.handshaking_peer().is_some() {
                drop(gate);
                drop(range);
                self.await_handshakes().await;
                continue;
            }
            if let Some(s) = self.target_source() {
                break (range, gate, Some(s.peer));
            }
            if self.disk() == DiskState::UpToDate {
                break (range, gate, None);
            }
            drop(gate);
            drop(range);
            self.data_path().await.map_err(|_| IoError::SourceLost)?;
        };
        // Taken under the gate, held to the end: until everything this write records is
        // recorded (lost peers only after the acks), a new connection's `State` waits.
        let _settling = self.write_settling();
        let (targets, missing) = self.replication_targets();
        let as_target = match source {
            Some(s) if !targets.iter().any(|c| c.peer == s) => return Err(IoError::SourceLost),
            other => other,
        };
        if as_target.is_some() {
            // Our generation is about to become the source's: track the peers we miss
            // without minting (the source tracks them too, from `missing`).
            self.record_received_write(&missing, offset, len).await?;
        } else if !detached {
            self.record_missed_write(&missing, offset, len).await?;
        }
        let seq = self.next_seq();
        // As target, whatever the protocol: acknowledged only once the source wrote it.
        let ack = match as_target {
            Some(_) => AckMode::Write,
            None => AckMode::from(self.settings.protocol),
        };
        // The message names the peers we cannot reach: receivers track it for them too.
        let (frame, data) = match data {
            Some(data) => {
                let msg = PeerMsg::Write {
                    seq,
                    offset,
                    data,
                    fua,
                    ack,
                    missing: missing.clone(),
                };
                let f = frame::encode(Channel::Replication, &msg)
                    .map_err(|e| EngineError::Refused(e.to_string()))?;
                let PeerMsg::Write { data, .. } = msg else {
                    unreachable!("built above")
                };
                (f, Some(data))
            }
            None => {
                let msg = PeerMsg::Zero {
                    seq,
                    offset,
                    len,
                    fua,
                    ack,
                    missing: missing.clone(),
                };
                let f = frame::encode(Channel::Replication, &msg)
                    .map_err(|e| EngineError::Refused(e.to_string()))?;
                (f, None)
            }
        };
        let frame = Arc::new(frame);
        let local = async {
            if detached {
                return Ok(());
            }
            self.write_app_data_locally(offset, len, data).await?;
            if fua {
                self.backing.sync().await?;
            }
            Ok::<_, BackingError>(())
        };
        let mut waits = Vec::with_capacity(targets.len());
        for c in &targets {
            let rx = (ack != AckMode::None).then(|| c.expect_ack(seq));
            self.count_sent_write(c);
            if c.send_frame(frame.clone()).await {
                waits.push((c.peer, rx));
            } else {
                waits.push((c.peer, None));
            }
        }
        drop(gate);
        let remote = async {
            let mut lost: Vec<NodeId> = Vec::new();
            for (peer, rx) in waits {
                match rx {
                    Some(rx) => match rx.await {
                        Ok(Ok(())) => {}
                        Ok(Err(reason)) => {
                            tracing::warn!(resource = %self.name(), %peer, %reason, "peer failed a write");
                            lost.push(peer);
                        }
                        Err(_) => lost.push(peer),
                    },
                    None if ack == AckMode::None => {}
                    None => lost.push(peer),
                }
            }
            lost
        };
        let local = async {
            let r = local.await;
            drop(range);
            r
        };
        let (local, lost) = tokio::join!(local, remote);
        if let Err(e) = local {
            // Detach: the write stands if a peer has it (the source, as target); pass-on:
            // report the error.
            let source_lost = as_target.is_some_and(|s| lost.contains(&s));
            if !self.on_disk_error(&e).await || lost.len() >= targets.len() || source_lost {
                return Err(e.into());
            }
            return Ok(());
        }
        if detached {
            return if lost.len() < targets.len() {
                Ok(())
            } else {
                Err(IoError::NotUpToDate(DiskState::Diskless))
            };
        }
        match as_target {
            // Tracked without minting, as for `missing` above.
            Some(s) => {
                let others: Vec<NodeId> = lost.iter().copied().filter(|p| *p != s).collect();
                self.record_received_write(&others, offset, len).await?;
            }
            // Those peers may lack this write: record it before acknowledging.
            None => self.record_missed_write(&lost, offset, len).await?,
        }
        if ack != AckMode::None && !targets.is_empty() {
            // Every target that has it learns that the others do too (or which do not);
            // encoded once, like the write itself.
            // (`lost` is nearly always empty: cloning it allocates nothing.)
            let msg = PeerMsg::PeerAck {
                seq,
                lost: lost.clone(),
            };
            if let Ok(f) = frame::encode(Channel::Replication, &msg) {
                let f = Arc::new(f);
                for c in targets.iter().filter(|c| !lost.contains(&c.peer)) {
                    c.send_frame(f.clone()).await;
                }
            }
        }
        // Only the source's copy makes a target's write durable (the targets that have it
        // learned from `PeerAck` that the source does not).
        if as_target.is_some_and(|s| lost.contains(&s)) {
            return Err(IoError::SourceLost);
        }
        let needed = self.quorum_needed();
        if needed > 0 && !self.await_quorum(Some(targets.len() - lost.len())).await {
            // Our disk has a write the majority may never see: never acknowledge it, and
            // take a peer's copy at the next connect.
            self.persist(|sb| sb.flags |= crate::meta::format::FLAG_LOST_QUORUM)
                .await?;
            tracing::error!(resource = %self.name(), "write lost quorum while in flight: failed with EIO, local copy will be resynced from a peer");
            return Err(IoError::NoQuorum);
        }
        Ok(())
    }

    /// FLUSH: returns when every connected copy is durable (fdatasync everywhere).
    pub async fn flush(&self) -> Result<(), IoError> {
        if self.is_down() {
            return Err(IoError::Down);
        }
        self.wait_for_quorum().await?;
        // A flush that loses a peer mints a new generation: like a write, it waits for a
        // running handshake and then delays new connections' `State` until it is done.
        let _settling = loop {
            self.await_handshakes().await;
            let _gate = self.topology_gate.read().await;
            if self.handshaking_peer().is_none() {
                break self.write_settling();
            }
        };
        let seq = self.next_seq();
        let detached = self.is_detached();
        // A Primary that is SyncTarget: durable only once its source flushed (waited for
        // briefly right after `invalidate`, as a write does).
        let as_target = match self.target_source() {
            _ if detached || self.role() != Role::Primary => None,
            Some(s) => Some(s.peer),
            None => self
                .data_path()
                .await
                .map_err(|_| IoError::SourceLost)?
                .map(|s| s.peer),
        };
        let (targets, _) = self.replication_targets();
        if as_target.is_some_and(|s| !targets.iter().any(|c| c.peer == s)) {
            return Err(IoError::SourceLost);
        }
        let mut waits = Vec::new();
        for c in &targets {
            let rx = c.expect_ack(seq);
            if c.send(&PeerMsg::Flush { seq }).await {
                waits.push((c.peer, rx));
            } else if Some(c.peer) == as_target {
                return Err(IoError::SourceLost);
            }
        }
        let local = async {
            if detached {
                Ok(())
            } else {
                self.backing.sync().await
            }
        };
        let remote = async {
            let mut lost = Vec::new();
            for (peer, rx) in waits {
                if !matches!(rx.await, Ok(Ok(()))) {
                    lost.push(peer);
                }
            }
            lost
        };
        let (local, lost) = tokio::join!(local, remote);
        if let Err(e) = local {
            if !self.on_disk_error(&e).await || lost.len() >= targets.len() {
                return Err(e.into());
            }
            return Ok(());
        }
        if detached {
            return Ok(());
        }
        if let Some(source) = as_target {
            // Peers that failed it keep their unflushed writes unconfirmed; the source
            // tracks what they miss.
            return match lost.contains(&source) {
                true => Err(IoError::SourceLost),
                false => Ok(()),
            };
        }
        if !lost.is_empty() && self.role() == Role::Primary {
            // Their earlier writes are bitmapped; mark the generation so they resync.
            self.ensure_bitmap_generation(&lost).await?;
        }
        Ok(())
    }
}
