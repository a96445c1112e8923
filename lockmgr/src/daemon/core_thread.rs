//! The replica task (it was a thread of its own until session 17; the file keeps its name):
//! owns the `NodeCore`, drains every queued input before each `process()` (so one fsync
//! covers everything that arrived meanwhile: group commit), ticks on time, and hands
//! messages to the peer senders and effects to client connections. It runs on the
//! daemon's only thread and blocks it while it works (see `daemon::run`).

use super::direct::PeerOut;
use super::peer::PeerFrame;
use crate::node::{CoreError, LogSink, MemberChange, NodeCore, Probe};
use crate::proto::{ClientReply, CLIENT_PROTOCOL_MAX};
use crate::table::{Command, Effect, EndReason, LockError};
use crate::types::{ReqId, SessionId};
use protobuf::Message as _;
use raft::prelude::Message;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_common::NodeId;
use tokio::sync::oneshot;

pub use super::flow::Replies;

pub enum CoreInput {
    Raft(Box<Message>),
    Probe(NodeId, Probe),
    /// A client connection asks for a session; answered with its id (or a refusal).
    Open {
        client: String,
        replies: Replies,
        opened: oneshot::Sender<Result<SessionId, String>>,
    },
    Submit(Command),
    /// The connection of this session closed: release its locks.
    Gone(SessionId),
    Member {
        session: SessionId,
        req: ReqId,
        change: MemberChange,
    },
    Status {
        req: ReqId,
        replies: Replies,
    },
    Locks {
        req: ReqId,
        lockspace: String,
        replies: Replies,
    },
}

struct WaitingOpen {
    client: String,
    replies: Replies,
    opened: oneshot::Sender<Result<SessionId, String>>,
}

pub struct CoreThread<K: LogSink> {
    pub core: NodeCore<K>,
    pub inputs: tokio::sync::mpsc::Receiver<CoreInput>,
    pub peers: BTreeMap<NodeId, Arc<PeerOut>>,
    pub tick: Duration,
}

impl<K: LogSink> CoreThread<K> {
    /// Runs until every input sender is gone or the durable log fails. A task on the
    /// daemon's only thread (see `daemon::run`): it blocks that thread while it works.
    pub async fn run(mut self) -> Result<(), CoreError> {
        let mut sessions: BTreeMap<SessionId, Replies> = BTreeMap::new();
        let mut waiting: Vec<WaitingOpen> = Vec::new();
        let mut next_session: u64 = 0;
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let first = tokio::select! {
                input = self.inputs.recv() => match input {
                    Some(input) => Some(input),
                    None => return Ok(()),
                },
                _ = tokio::time::sleep_until(next_tick.into()) => None,
            };
            // The socket tasks woken with us queue what they read before we take it.
            tokio::task::yield_now().await;
            let mut batch: Vec<CoreInput> = first.into_iter().collect();
            // Group commit: everything already queued joins this Ready.
            while batch.len() < 65_536 {
                match self.inputs.try_recv() {
                    Ok(input) => batch.push(input),
                    Err(_) => break,
                }
            }
            for input in batch {
                self.handle(input, &mut sessions, &mut waiting);
            }
            if Instant::now() >= next_tick {
                self.core.tick();
                next_tick += self.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.tick;
                }
            }
            if self.core.is_ready_for_sessions() {
                for w in waiting.drain(..) {
                    next_session += 1;
                    let session = SessionId {
                        node: self.core.id(),
                        incarnation: self.core.incarnation(),
                        seq: next_session,
                    };
                    if w.opened.send(Ok(session)).is_ok() {
                        sessions.insert(session, w.replies);
                        self.core.submit(Command::OpenSession {
                            session,
                            client: w.client,
                        });
                    }
                }
            }
            let peers = &self.peers;
            let mut send = |m: Message| {
                let Ok(to) = u8::try_from(m.to) else { return };
                if let Some(out) = peers.get(&NodeId(to)) {
                    // Dropped if the peer is slow or gone; Raft resends.
                    out.send(&PeerFrame::Raft(m.write_to_bytes().unwrap_or_default()));
                }
            };
            let out = self.core.process_with(&mut send)?;
            for m in out.messages {
                send(m);
            }
            for (to, probe) in out.probes {
                if let Some(out) = self.peers.get(&to) {
                    out.send(&PeerFrame::Probe(probe));
                }
            }
            for fx in out.effects {
                deliver(&mut sessions, fx);
            }
            // Self-fenced or resynchronised: sessions of the old incarnation are void, even
            // those still opening.
            let incarnation = self.core.incarnation();
            sessions.retain(|s, replies| {
                if s.incarnation == incarnation {
                    return true;
                }
                let _ = replies.send(ClientReply::Ended {
                    reason: EndReason::Restarted,
                });
                false
            });
        }
    }

    fn handle(
        &mut self,
        input: CoreInput,
        sessions: &mut BTreeMap<SessionId, Replies>,
        waiting: &mut Vec<WaitingOpen>,
    ) {
        match input {
            CoreInput::Raft(m) => self.core.step(*m),
            CoreInput::Probe(from, p) => self.core.on_probe(from, p),
            CoreInput::Open {
                client,
                replies,
                opened,
            } => {
                if self.is_witness() {
                    let _ = opened.send(Err("this node is a witness and serves no locks".into()));
                } else {
                    waiting.push(WaitingOpen {
                        client,
                        replies,
                        opened,
                    });
                }
            }
            CoreInput::Submit(cmd) => self.core.submit(cmd),
            CoreInput::Gone(session) => {
                if sessions.remove(&session).is_some() {
                    self.core.submit(Command::CloseSession { session });
                }
            }
            CoreInput::Member {
                session,
                req,
                change,
            } => self.core.change_members(session, req, change),
            CoreInput::Status { req, replies } => {
                let _ = replies.send(ClientReply::Status {
                    req,
                    status: self.core.status(),
                });
            }
            CoreInput::Locks {
                req,
                lockspace,
                replies,
            } => {
                let _ = replies.send(ClientReply::Locks {
                    req,
                    resources: self.core.table().resources_in(&lockspace),
                });
            }
        }
    }

    fn is_witness(&self) -> bool {
        self.core.is_witness()
    }
}

fn deliver(sessions: &mut BTreeMap<SessionId, Replies>, fx: Effect) {
    let session = fx.session();
    let Some(replies) = sessions.get(&session) else {
        return;
    };
    let (reply, last) = match fx {
        Effect::SessionOpened { session } => (
            ClientReply::Welcome {
                version: CLIENT_PROTOCOL_MAX,
                session: Some(session),
            },
            false,
        ),
        Effect::SessionEnded { reason, .. } => (ClientReply::Ended { reason }, true),
        Effect::Granted {
            req,
            lock,
            mode,
            token,
            lvb,
            lvb_valid,
            ..
        } => (
            ClientReply::Granted {
                req,
                lock,
                mode,
                token,
                lvb,
                lvb_valid,
            },
            false,
        ),
        Effect::Failed {
            req: ReqId(0),
            error: LockError::Refused(message),
            ..
        } => (ClientReply::Error { message }, true),
        Effect::Failed {
            req, lock, error, ..
        } => (ClientReply::Failed { req, lock, error }, false),
        Effect::Blocking { lock, wanted, .. } => (ClientReply::Blocking { lock, wanted }, false),
        Effect::Unlocked { req, lock, .. } => (ClientReply::Unlocked { req, lock }, false),
        Effect::Done { req, .. } => (ClientReply::Done { req }, false),
    };
    let _ = replies.send(reply);
    if last {
        sessions.remove(&session);
    }
}
