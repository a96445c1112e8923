//! The connection handshake and application writes.
//!
//! Each side sends its `State` when a connection comes up and decides (resync, which
//! direction, which blocks) when it reads the peer's (`sync.rs::handshake_decision`). The
//! peer decides on the `State` we sent, so that `State` must still describe us when we
//! decide on theirs. An application write in between misses the peer (it is not yet
//! Established): it sets bits for the peer and may mint a new generation after the peer
//! has seen our old one. The two sides then decide on different data — the simulation
//! shows inconsistent plans (`TANDEM_SIM_HANDSHAKE_WRITES=1`: one side Idle, the other
//! Source), and when the peer decided it was the source because it held doubt bits for
//! us, the blocks we wrote meanwhile were neither resynced nor kept tracked, so the peer
//! never got them (`SyncDone` clears our bits for the source).
//!
//! So a new connection opens in one step under the topology gate (`open_conn`):
//! - the previous session with that peer has ended, cleanup included (a protocol A/B
//!   Primary marks the writes that session may have lost; a replaced connection must not
//!   keep its replication state);
//! - every write or flush that passed its handshake check has finished, including what it
//!   records for peers that failed it (`WritesSettled`; they hold the gate only until
//!   queued, and record lost peers and mint after their acks);
//! - our first `State` is queued on the connection before anyone else can see it, so no
//!   other message (a `State` broadcast, `Topology`, `Uuids`) reaches the peer first.
//!
//! Then, until our decision on the peer's `State`, writes and flushes wait — about one
//! round trip. A handshake older than `HANDSHAKE_WAIT` while writes wait is ended (the
//! connection is closed, so no decision made on that `State` can act) and they go on
//! without the peer, as with any peer that is not connected.
//!
//! Not covered: our state can still change in that window through others — a third
//! node's write applied here that misses the peer, a `Uuids` adopted from a third node, a
//! resync from another source ending, a promotion. The later `State` we send after such a
//! change makes the peer re-decide (`reevaluate`), but bits for the peer recorded here in
//! that window are cleared if the peer becomes our resync source (their writer still
//! tracks them).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tandem_common::NodeId;
use tokio::sync::mpsc;

use super::{Conn, ConnState, Resource};
use crate::proto::PeerMsg;

/// How long a connection's handshake may keep application writes waiting.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(2);
/// How long a new connection waits for the previous session with the same peer to end.
const OLD_SESSION_WAIT: Duration = Duration::from_secs(10);

/// Held by a write or flush from its handshake check until it has recorded everything it
/// records (lost peers, a new generation): a new connection's first `State` waits for it.
pub(super) struct WriteSettling<'a>(&'a Resource);

impl Drop for WriteSettling<'_> {
    fn drop(&mut self) {
        if self.0.writes_unsettled.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.writes_settled.notify_waiters();
        }
    }
}

impl Resource {
    /// A new authenticated connection to `peer`, opened as the module comment says: the
    /// returned connection has our first `State` queued and is registered.
    pub async fn open_conn(&self, peer: NodeId, out: mpsc::Sender<Arc<Vec<u8>>>) -> Arc<Conn> {
        let _gate = self.topology_gate.write().await;
        let old = self.peer_view(peer).and_then(|p| p.conn);
        if let Some(old) = old {
            old.close();
            if tokio::time::timeout(OLD_SESSION_WAIT, old.wait_ended())
                .await
                .is_err()
            {
                tracing::warn!(resource = %self.name(), %peer,
                    "the previous session with this peer did not end in {OLD_SESSION_WAIT:?}; replacing it anyway");
                self.set_repl(peer, super::ReplState::Off);
            }
        }
        loop {
            let settled = self.writes_settled.notified();
            if self.writes_unsettled.load(Ordering::Acquire) == 0 {
                break;
            }
            settled.await;
        }
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        let conn = Conn::new(peer, epoch, out);
        conn.send(&PeerMsg::State(self.local_state(peer))).await;
        self.handshakes_running.fetch_add(1, Ordering::AcqRel);
        let replaced = self.update_peer(peer, |p| {
            p.last_error = None;
            p.conn.replace(conn.clone())
        });
        if let Some(Some(old)) = replaced {
            old.close(); // one that appeared meanwhile (not expected)
        }
        self.set_conn_state(peer, ConnState::Connected);
        self.conn_changed.store(true, Ordering::Release);
        self.quorum_changed.notify_waiters();
        conn
    }

    /// Our decision on `conn` is made, or its session ended: writes go on. Idempotent.
    pub fn handshake_finished(&self, conn: &Conn) {
        if conn.handshaking.swap(false, Ordering::AcqRel) {
            self.handshakes_running.fetch_sub(1, Ordering::AcqRel);
            self.handshakes_done.notify_waiters();
        }
    }

    /// A live connection to a disk peer whose handshake is still running on our side.
    pub(super) fn handshaking_peer(&self) -> Option<Arc<Conn>> {
        if self.handshakes_running.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.connections().into_iter().find(|c| {
            c.handshaking.load(Ordering::Acquire) && !c.is_closed() && !self.is_tiebreaker(c.peer)
        })
    }

    /// Waits (holding neither a range nor the gate) until no handshake runs, ending any
    /// that has run for longer than `HANDSHAKE_WAIT`.
    pub(super) async fn await_handshakes(&self) {
        let mut counted = false;
        loop {
            // Every write comes here: without a handshake running, one atomic load.
            if self.handshakes_running.load(Ordering::Acquire) == 0 {
                return;
            }
            let done = self.handshakes_done.notified();
            let Some(conn) = self.handshaking_peer() else {
                return;
            };
            if !counted {
                self.stats.handshake_waits.fetch_add(1, Ordering::Relaxed);
                counted = true;
            }
            let left = HANDSHAKE_WAIT.saturating_sub(conn.opened.elapsed());
            if left.is_zero() {
                tracing::warn!(resource = %self.name(), peer = %conn.peer,
                    "connection handshake did not finish in {HANDSHAKE_WAIT:?} while writes waited: disconnecting (it retries)");
                conn.close();
                self.handshake_finished(&conn);
                continue;
            }
            // Re-checked at least every 50 ms: a closed connection notifies nobody.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), done).await;
        }
    }

    /// Called under the topology gate by a write or flush that passed its handshake
    /// check; hold the result until it has recorded everything.
    pub(super) fn write_settling(&self) -> WriteSettling<'_> {
        self.writes_unsettled.fetch_add(1, Ordering::AcqRel);
        WriteSettling(self)
    }
}

impl Conn {
    /// Marks this connection's session over (cleanup done): a new connection to the same
    /// peer may open.
    pub fn session_ended(&self) {
        self.ended.send_replace(true);
    }

    async fn wait_ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|ended| *ended).await;
    }
}
