//! Online verify (DRBD's `verify`): compare per-block checksums with a peer while the
//! volume stays in use, mark differing blocks out of sync in our bitmap for that peer
//! (they move with the next `invalidate-remote` or resync), and `invalidate` /
//! `invalidate-remote` / `outdate`.

use std::sync::Arc;
use std::time::Instant;

use tandem_common::NodeId;
use tokio::sync::oneshot;

use super::bitmap::{DirtyBitmap, BLOCK_BYTES};
use super::{Conn, EngineError, Resource, SyncProgress};
use crate::proto::PeerMsg;
use crate::state::{DiskState, ReplState, Role};

const VERIFY_CHUNK_BYTES: u64 = 1 << 20;

/// crc32 of each 4 KiB block (the last may be short).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_BYTES as usize)
        .map(crc32fast::hash)
        .collect()
}

impl Conn {
    pub fn expect_verify(&self, seq: u64) -> oneshot::Receiver<Vec<u32>> {
        let (tx, rx) = oneshot::channel();
        if !self.is_closed() {
            self.verify_pending.lock().insert(seq, tx);
        }
        rx
    }

    pub fn complete_verify(&self, seq: u64, crcs: Vec<u32>) {
        if let Some(tx) = self.verify_pending.lock().remove(&seq) {
            let _ = tx.send(crcs);
        }
    }
}

impl Resource {
    /// Starts an online verify against every Established peer; returns their names.
    pub fn start_verify(self: &Arc<Self>) -> Result<Vec<String>, EngineError> {
        self.refuse_if_diskless("verify")?;
        if self.disk() != DiskState::UpToDate {
            return Err(EngineError::Refused(
                "verify needs UpToDate local data".into(),
            ));
        }
        let conns: Vec<(Arc<Conn>, String)> = {
            let inner = self.inner.lock();
            inner
                .peers
                .iter()
                .filter(|(id, _)| !self.is_tiebreaker(**id))
                .map(|(_, p)| p)
                .filter(|p| p.repl == ReplState::Established && p.verify.is_none())
                .filter_map(|p| p.conn.clone().map(|c| (c, p.name.clone())))
                .collect()
        };
        if conns.is_empty() {
            return Err(EngineError::Refused(
                "no Established peer to verify against (see `tandemadm status`)".into(),
            ));
        }
        let mut names = Vec::new();
        for (conn, name) in conns {
            names.push(name);
            let me = self.clone();
            self.update_peer(conn.peer, |p| {
                p.verify = Some(SyncProgress {
                    total_bytes: me.usable_bytes,
                    done_bytes: 0,
                    started: Instant::now(),
                })
            });
            self.set_repl(conn.peer, ReplState::VerifyS);
            tokio::spawn(async move {
                let r = me.run_verify(&conn).await;
                me.update_peer(conn.peer, |p| p.verify = None);
                if me
                    .peer_view(conn.peer)
                    .is_some_and(|p| p.repl == ReplState::VerifyS)
                {
                    me.set_repl(conn.peer, ReplState::Established);
                }
                match r {
                    Ok(oos) => {
                        me.update_peer(conn.peer, |p| p.last_verify_oos_blocks = Some(oos));
                        tracing::info!(resource = %me.name(), peer = %conn.peer, out_of_sync_blocks = oos,
                            "online verify done{}", if oos > 0 { ": run `tandemadm invalidate-remote` here or `tandemadm invalidate` on the peer to repair" } else { "" });
                    }
                    Err(e) => {
                        tracing::warn!(resource = %me.name(), peer = %conn.peer, error = %e, "online verify aborted")
                    }
                }
            });
        }
        Ok(names)
    }

    async fn run_verify(self: &Arc<Self>, conn: &Arc<Conn>) -> Result<u64, String> {
        let mut oos = 0u64;
        let mut offset = 0u64;
        let mut found = DirtyBitmap::new(self.usable_bytes);
        while offset < self.usable_bytes {
            if conn.is_closed() || self.is_down() {
                return Err("connection closed".into());
            }
            let len = VERIFY_CHUNK_BYTES.min(self.usable_bytes - offset);
            let seq = self.next_seq();
            let rx = conn.expect_verify(seq);
            let mine = {
                // Under the range lock: no write to this range can be queued to the peer
                // between our read and the request, so both sides see the same writes.
                let _range = self.ranges.lock(offset, len).await;
                let data = self
                    .backing
                    .read_at(offset, len as usize)
                    .await
                    .map_err(|e| e.to_string())?;
                if !conn
                    .send(&PeerMsg::VerifyRequest { seq, offset, len })
                    .await
                {
                    return Err("connection closed".into());
                }
                block_crcs(&data)
            };
            let theirs = rx.await.map_err(|_| "connection closed".to_string())?;
            if theirs.len() != mine.len() {
                return Err("peer answered a different number of blocks".into());
            }
            for (i, (a, b)) in mine.iter().zip(&theirs).enumerate() {
                if a != b {
                    let at = offset + i as u64 * BLOCK_BYTES;
                    tracing::warn!(resource = %self.name(), peer = %conn.peer, offset = at, "Out of sync: block differs from peer");
                    found.set_range(at, BLOCK_BYTES);
                    oos += 1;
                }
            }
            offset += len;
            self.update_peer(conn.peer, |p| {
                if let Some(v) = p.verify.as_mut() {
                    v.done_bytes = offset;
                }
            });
        }
        if oos > 0 {
            self.merge_out_of_sync(conn.peer, &found)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(oos)
    }

    /// Adds blocks to our bitmap for `peer` (persisted).
    async fn merge_out_of_sync(
        &self,
        peer: NodeId,
        found: &DirtyBitmap,
    ) -> Result<(), EngineError> {
        let mut from = 0;
        {
            let mut bms = self.bitmaps.lock();
            if let Some((_, bm)) = bms.get_mut(&peer) {
                while let Some((o, l)) = found.next_run(from, u64::MAX) {
                    bm.set_range(o, l);
                    from = o + l;
                }
            }
        }
        self.persist_whole_bitmap(peer).await
    }

    /// Peer side of verify: checksums after every earlier message was applied.
    pub(super) async fn answer_verify(
        &self,
        conn: &Conn,
        seq: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), String> {
        if len > VERIFY_CHUNK_BYTES
            || offset
                .checked_add(len)
                .is_none_or(|e| e > self.usable_bytes)
        {
            return Err("verify request out of range".into());
        }
        let data = self
            .backing
            .read_at(offset, len as usize)
            .await
            .map_err(|e| e.to_string())?;
        conn.send(&PeerMsg::VerifyReply {
            seq,
            crcs: block_crcs(&data),
        })
        .await;
        Ok(())
    }

    /// `tandemadm invalidate`: our data is bad; become Inconsistent and take a full
    /// resync from a connected UpToDate peer.
    pub async fn invalidate(self: &Arc<Self>) -> Result<(), EngineError> {
        self.refuse_if_diskless("invalidate")?;
        // A Primary keeps serving I/O through the source while it resyncs
        // (target_io.rs), as DRBD does; any node needs a source that is there now.
        let has_source = self.inner.lock().peers.values().any(|p| {
            p.conn.is_some()
                && p.repl == ReplState::Established
                && p.state
                    .as_ref()
                    .is_some_and(|s| s.disk == DiskState::UpToDate)
        });
        if !has_source {
            return Err(EngineError::Refused(
                "no connected UpToDate peer to resync from; connect one first (`tandemadm status` shows the peers)".into(),
            ));
        }
        self.persist(|sb| sb.disk_state = DiskState::Inconsistent)
            .await?;
        self.set_disk(DiskState::Inconsistent);
        tracing::warn!(resource = %self.name(), "invalidated: local data will be resynced from a peer");
        self.broadcast_state().await;
        Ok(())
    }

    /// `tandemadm invalidate-remote`: the peers' data is bad; resync them from us — only
    /// the blocks a verify found different when it found any, else everything.
    pub async fn invalidate_remote(self: &Arc<Self>) -> Result<Vec<String>, EngineError> {
        self.refuse_if_diskless("invalidate-remote")?;
        if self.disk() != DiskState::UpToDate {
            return Err(EngineError::Refused(
                "invalidate-remote needs UpToDate local data".into(),
            ));
        }
        let peers: Vec<(Arc<Conn>, String)> = {
            let inner = self.inner.lock();
            inner
                .peers
                .iter()
                .filter(|(id, _)| !self.is_tiebreaker(**id))
                .map(|(_, p)| p)
                .filter(|p| p.repl == ReplState::Established)
                .filter_map(|p| p.conn.clone().map(|c| (c, p.name.clone())))
                .collect()
        };
        if peers.is_empty() {
            return Err(EngineError::Refused("no Established peer".into()));
        }
        let mut names = Vec::new();
        for (conn, name) in peers {
            let dirty = self.bitmap_dirty_bytes(conn.peer);
            if dirty == 0 {
                if let Some((_, bm)) = self.bitmaps.lock().get_mut(&conn.peer) {
                    bm.set_all();
                }
            }
            self.start_resync(conn, true, &[], Some(&[]));
            names.push(name);
        }
        Ok(names)
    }

    /// `tandemadm outdate`: mark our data Outdated (only while disconnected Secondary).
    pub async fn outdate(&self) -> Result<(), EngineError> {
        self.refuse_if_diskless("outdate")?;
        if self.role() == Role::Primary {
            return Err(EngineError::Refused("refusing to outdate a Primary".into()));
        }
        let connected = self
            .inner
            .lock()
            .peers
            .iter()
            .any(|(id, p)| p.conn.is_some() && !self.is_tiebreaker(*id));
        if connected {
            return Err(EngineError::Refused(
                "outdate is for a disconnected node (run `tandemadm disconnect` first)".into(),
            ));
        }
        if self.disk() != DiskState::UpToDate {
            return Ok(());
        }
        self.persist(|sb| sb.disk_state = DiskState::Outdated)
            .await?;
        self.set_disk(DiskState::Outdated);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn crcs_per_block() {
        let mut d = vec![0u8; 8192 + 10];
        d[5000] = 1;
        let c = super::block_crcs(&d);
        assert_eq!(c.len(), 3);
        assert_ne!(c[0], c[1]);
    }
}
