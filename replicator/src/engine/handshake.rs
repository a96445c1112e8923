//! The connection handshake and application writes.
//!
//! Each side sends its `State` when a connection comes up and decides (resync, which
//! direction, which blocks) when it reads the peer's (`sync.rs::handshake_decision`). The
//! peer decides on the `State` we sent, so that `State` must still describe us when we
//! decide on theirs. An application write in between misses the peer (it is not yet
//! Established): it sets bits for the peer and may mint a new generation after the peer
//! has seen our old one. The two sides then decide on different data — the simulation
//! shows inconsistent plans (`TANDEM_SIM_HANDSHAKE_WRITES=1` without this rule: one side
//! Idle, the other Source), and when the peer decided it was the source because it held
//! doubt bits for us, the blocks we wrote meanwhile were neither resynced nor kept
//! tracked, so the peer never got them (`SyncDone` clears our bits for the source).
//!
//! So: our `State` is built under the topology gate (every write that already counted the
//! peer as missing has recorded its bits by then), and a write that finds a disk peer
//! between our `State` and our decision waits for the decision — about one round trip.
//! A handshake that does not finish within `HANDSHAKE_WAIT` is ended (the connection is
//! closed, so no decision made on that `State` can act) and the write goes on without
//! the peer, as with any peer that is not connected.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Conn, Resource};
use crate::proto::PeerMsg;

/// How long an application write waits for a connection's handshake to finish.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(2);

impl Resource {
    /// Sends our first `State` on a new connection, consistent with every write that
    /// counted this peer as missing (they hold the gate until they have recorded it).
    pub async fn send_first_state(&self, conn: &Arc<Conn>) {
        let state = {
            let _gate = self.topology_gate.write().await;
            self.local_state(conn.peer)
        };
        conn.send(&PeerMsg::State(state)).await;
    }

    /// Our decision on `conn` is made (or the connection failed): writes go on.
    pub(super) fn handshake_finished(&self, conn: &Conn) {
        conn.handshaking.store(false, Ordering::Release);
        self.handshakes_done.notify_waiters();
    }

    /// A connection to a disk peer whose handshake is still running on our side.
    pub(super) fn handshaking_peer(&self) -> Option<Arc<Conn>> {
        self.connections().into_iter().find(|c| {
            c.handshaking.load(Ordering::Acquire) && !c.is_closed() && !self.is_tiebreaker(c.peer)
        })
    }

    /// Waits (holding neither the range nor the gate) until no handshake runs, ending
    /// any that takes longer than `HANDSHAKE_WAIT` from when this write started waiting.
    pub(super) async fn await_handshakes(&self) {
        self.stats.handshake_waits.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        while let Some(conn) = self.handshaking_peer() {
            let notified = self.handshakes_done.notified();
            let left = HANDSHAKE_WAIT.saturating_sub(started.elapsed());
            if left.is_zero() {
                tracing::warn!(resource = %self.name(), peer = %conn.peer,
                    "connection handshake did not finish in {HANDSHAKE_WAIT:?} while writes waited: disconnecting (it retries)");
                conn.close();
                self.handshake_finished(&conn);
                continue;
            }
            // Re-checked at least every 50 ms: a closed connection notifies nobody.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), notified).await;
        }
    }
}
