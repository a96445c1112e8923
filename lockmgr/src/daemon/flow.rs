//! Flow control of one client connection, so that no client can make the daemon's memory
//! grow: at most [`MAX_UNANSWERED`] requests may be unanswered at once (the connection
//! stops reading until replies go out: backpressure through the socket), and at most
//! [`REPLY_QUEUE`] replies may wait to be written. A client that stops reading its replies
//! fills the reply queue and is disconnected (its session ends, its locks are released),
//! instead of the daemon buffering for it without end.

use super::direct::{Push, ReplyOut};
use crate::proto::ClientReply;
use crate::types::ReqId;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tandem_common::frame::{self, Channel};
use tokio::sync::Notify;

/// Requests of one connection sent on and not answered yet. A lock waiting for a
/// conflicting holder counts; a client needing more waiting requests opens another
/// connection (the filesystem has a few per FUSE thread at most). Kept small because
/// every admitted request of a flooding client sits in the replica's queue ahead of
/// other clients' requests. Releases (unlock, cancel) get twice the room, so a client
/// whose waiting requests fill its share can still let go of what others wait for.
pub const MAX_UNANSWERED: usize = 256;
/// Replies (answers plus blocking callbacks) that may wait for one connection's socket.
pub const REPLY_QUEUE: usize = 8192;

/// The replica's handle on a connection's replies: it writes them into the socket
/// itself (`direct::ReplyOut`), queueing what the socket does not take.
#[derive(Clone)]
pub struct Replies {
    out: Arc<ReplyOut>,
    overflow: Arc<Notify>,
    unanswered: Arc<Unanswered>,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replies")
    }
}

impl Replies {
    /// A reply queue for a connection whose unanswered requests are `unanswered`: the
    /// handle, and what fires when the client lets too many replies pile up.
    pub fn new(unanswered: Arc<Unanswered>) -> (Self, Arc<Notify>) {
        let overflow = Arc::new(Notify::new());
        (
            Self {
                out: Arc::new(ReplyOut::default()),
                overflow: overflow.clone(),
                unanswered,
            },
            overflow,
        )
    }

    /// Writes or queues a reply without blocking (the caller is the replica). False
    /// if the connection is gone or too many replies wait; the latter also fires
    /// `overflow`, so the connection ends. An answer frees its request's place at once:
    /// the reply queue's own limit bounds what a client that does not read can cost.
    pub fn send(&self, reply: ClientReply) -> bool {
        let Ok(bytes) = frame::encode(Channel::LockClient, &reply) else {
            return false;
        };
        let closing = matches!(reply, ClientReply::Ended { .. } | ClientReply::Error { .. });
        match self.out.push(&bytes, REPLY_QUEUE, closing) {
            Push::Taken => {
                self.unanswered.answered(&reply);
                true
            }
            Push::Full => {
                self.overflow.notify_one();
                false
            }
            Push::Gone => false,
        }
    }

    /// The writer side, for the connection's task.
    pub fn out(&self) -> Arc<ReplyOut> {
        self.out.clone()
    }

    /// The connection is over: nothing more is taken; what is queued still goes out.
    pub fn finish(&self) {
        self.out.finish();
    }
}

/// The request ids of one connection that await their answer.
#[derive(Default)]
pub struct Unanswered {
    ids: Mutex<HashSet<ReqId>>,
    freed: Notify,
}

impl Unanswered {
    /// Waits until the connection may have one more request outstanding, then records it.
    pub async fn admit(&self, req: ReqId, release: bool) {
        let limit = if release {
            2 * MAX_UNANSWERED
        } else {
            MAX_UNANSWERED
        };
        loop {
            let freed = self.freed.notified();
            {
                let mut ids = self.ids.lock().expect("unanswered set");
                if ids.len() < limit || ids.contains(&req) {
                    ids.insert(req);
                    return;
                }
            }
            freed.await;
        }
    }

    /// Called as a reply is written: an answer frees its request's place.
    pub fn answered(&self, reply: &ClientReply) {
        let Some(req) = answer_to(reply) else { return };
        if self.ids.lock().expect("unanswered set").remove(&req) {
            self.freed.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.ids.lock().expect("unanswered set").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The request a reply finally answers (blocking callbacks and session events answer none).
fn answer_to(reply: &ClientReply) -> Option<ReqId> {
    match reply {
        ClientReply::Granted { req, .. }
        | ClientReply::Failed { req, .. }
        | ClientReply::Unlocked { req, .. }
        | ClientReply::Done { req }
        | ClientReply::Status { req, .. }
        | ClientReply::Locks { req, .. } => Some(*req),
        ClientReply::Welcome { .. }
        | ClientReply::Ended { .. }
        | ClientReply::Error { .. }
        | ClientReply::Blocking { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_request_past_the_limit_waits_for_an_answer() {
        let u = Arc::new(Unanswered::default());
        for i in 1..=MAX_UNANSWERED as u64 {
            u.admit(ReqId(i), false).await;
        }
        // A release still gets in.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            u.admit(ReqId(0xfffe), true),
        )
        .await
        .expect("a release is admitted past the lock limit");
        u.answered(&ClientReply::Done { req: ReqId(0xfffe) });
        let next = {
            let u = u.clone();
            tokio::spawn(async move { u.admit(ReqId(0xffff), false).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!next.is_finished(), "admitted past the limit");
        // A blocking callback answers nothing; a Done does.
        u.answered(&ClientReply::Blocking {
            lock: crate::types::LockId(1),
            wanted: crate::types::Mode::EX,
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!next.is_finished());
        u.answered(&ClientReply::Done { req: ReqId(7) });
        tokio::time::timeout(std::time::Duration::from_secs(5), next)
            .await
            .expect("admitted after an answer")
            .unwrap();
        assert_eq!(u.len(), MAX_UNANSWERED);
    }

    #[tokio::test]
    async fn a_full_reply_queue_fires_overflow() {
        // No writer yet: every reply waits.
        let (r, overflow) = Replies::new(Arc::default());
        for i in 0..REPLY_QUEUE as u64 {
            assert!(r.send(ClientReply::Done { req: ReqId(i + 1) }));
        }
        assert!(!r.send(ClientReply::Done { req: ReqId(0) }));
        tokio::time::timeout(std::time::Duration::from_secs(5), overflow.notified())
            .await
            .expect("overflow fired");
    }
}
