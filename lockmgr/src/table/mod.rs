//! The replicated lock table: a pure, deterministic state machine. Raft log entries are
//! `Command`s; applying one returns `Effect`s (completions, blocking callbacks, failures) that
//! the daemon owning the addressed session delivers. Every replica applies every command, so
//! every replica computes the same effects; only the session's own node sends them.

mod command;
mod resource;
#[cfg(test)]
mod tests;
mod view;

use crate::types::{
    validate_lockspace, validate_resource, FencingToken, Flags, LockId, Lvb, Mode, ReqId, SessionId,
};
use resource::{Ctx, Resource};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tandem_common::NodeId;

pub use command::{Command, Effect, EndReason, LockError};
pub use resource::is_weaker_or_equal;
pub use view::{LockView, ResourceView};

/// Bound on remembered out-of-order request ids per session (duplicate suppression window).
const MAX_REQ_WINDOW: usize = 4096;
/// Bound on remembered sessions closed before their open was applied.
const MAX_CLOSED_EARLY: usize = 4096;
/// Locks one session may hold or request at once. A filesystem mount holds a few per
/// cached inode (its idle inode cache is capped at 4096), far below this; the cap keeps a
/// runaway client from growing every replica's memory without end.
pub const MAX_LOCKS_PER_SESSION: usize = 65_536;
/// Locks in the whole table: with the per-session cap, what bounds the replicas' memory
/// (docs/TESTING.md, "Overload").
pub const MAX_LOCKS_TOTAL: usize = 262_144;

/// A resource: lockspace plus resource name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResKey {
    pub lockspace: String,
    pub name: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pending {
    pub req: ReqId,
    pub mode: Mode,
    pub flags: Flags,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lock {
    pub owner: SessionId,
    pub key: ResKey,
    pub granted: Option<Mode>,
    pub pending: Option<Pending>,
    /// The owner's node died (or its session closed, for a `PERSISTENT` lock); held until
    /// recovery-done, never granted away.
    pub orphaned: bool,
    /// Asked for with `PERSISTENT`: orphaned rather than released when its session closes.
    pub persistent: bool,
    /// Orphaned because its session closed while its node stayed up: the process is gone,
    /// so RECOVERY requests may pass it and recovery-done may purge it without fencing.
    pub closed_orphan: bool,
    pub token: FencingToken,
    /// Bit per wanted mode already signalled with a blocking callback at this granted mode.
    pub basts_sent: u8,
}

/// Duplicate suppression: every request id at or below `floor` was applied, plus `above`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ReqWindow {
    floor: u64,
    above: BTreeSet<u64>,
}

impl ReqWindow {
    /// Records `req`; false if it was applied before.
    fn first_time(&mut self, req: ReqId) -> bool {
        if req.0 <= self.floor || !self.above.insert(req.0) {
            return false;
        }
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        if self.above.len() > MAX_REQ_WINDOW {
            // A client that leaves a gap this long lost a request for good; forgetting the
            // gap only means a very late duplicate of it would be dropped.
            let lowest = *self.above.first().expect("non-empty");
            self.floor = lowest - 1;
            while self.above.remove(&(self.floor + 1)) {
                self.floor += 1;
            }
        }
        true
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Session {
    client: String,
    locks: BTreeSet<LockId>,
    reqs: ReqWindow,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub incarnation: u64,
    pub up: bool,
    /// Orphans of this node may be recovered (fence confirmed or self-attested restart).
    pub fenced: bool,
}

/// The whole replicated state. Serialized as the Raft snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LockTable {
    resources: BTreeMap<ResKey, Resource>,
    locks: BTreeMap<LockId, Lock>,
    sessions: BTreeMap<SessionId, Session>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    next_lock_id: u64,
    last_token: u64,
    closed_early: BTreeSet<SessionId>,
}

impl LockTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one committed command. Deterministic: same table + command = same result.
    pub fn apply(&mut self, cmd: &Command) -> Vec<Effect> {
        let mut fx = Vec::new();
        match cmd {
            Command::OpenSession { session, client } => {
                self.open_session(*session, client, &mut fx)
            }
            Command::CloseSession { session } => {
                if self.sessions.contains_key(session) {
                    self.end_session(*session, false);
                    fx.push(Effect::SessionEnded {
                        session: *session,
                        reason: EndReason::Closed,
                    });
                    self.regrant_all(&mut fx);
                } else {
                    // Closed before its (lost, retried) open was applied: remember, so a late
                    // open cannot create a session nobody will ever close.
                    self.closed_early.insert(*session);
                    while self.closed_early.len() > MAX_CLOSED_EARLY {
                        self.closed_early.pop_first();
                    }
                }
            }
            Command::NodeDown { node, fenced } => self.node_down(*node, *fenced, &mut fx),
            Command::NodeRestart { node, incarnation } => {
                self.node_restart(*node, *incarnation, &mut fx)
            }
            Command::Lock { session, req, .. }
            | Command::Convert { session, req, .. }
            | Command::Unlock { session, req, .. }
            | Command::Cancel { session, req, .. }
            | Command::CancelRequest { session, req, .. }
            | Command::FenceAck { session, req, .. }
            | Command::RecoveryDone { session, req, .. } => {
                let Some(s) = self.sessions.get_mut(session) else {
                    fx.push(Effect::Failed {
                        session: *session,
                        req: *req,
                        lock: None,
                        error: LockError::NoSession,
                    });
                    return fx;
                };
                if !s.reqs.first_time(*req) {
                    return fx; // duplicate proposal after a retry: already applied
                }
                if let Err((lock, error)) = self.session_command(cmd, &mut fx) {
                    fx.push(Effect::Failed {
                        session: *session,
                        req: *req,
                        lock,
                        error,
                    });
                }
            }
        }
        fx
    }

    fn open_session(&mut self, session: SessionId, client: &str, fx: &mut Vec<Effect>) {
        if self.sessions.contains_key(&session) {
            return;
        }
        let rec = self.nodes.entry(session.node).or_insert(NodeRecord {
            incarnation: session.incarnation,
            up: true,
            fenced: false,
        });
        let refuse = if self.closed_early.remove(&session) {
            Some("the session was closed before it opened".to_string())
        } else if rec.incarnation != session.incarnation {
            Some("the daemon that opened it has restarted".to_string())
        } else if !rec.up && !rec.fenced {
            Some(format!(
                "node {} was declared down and is not fenced yet",
                session.node
            ))
        } else {
            None
        };
        if let Some(reason) = refuse {
            fx.push(Effect::Failed {
                session,
                req: ReqId(0),
                lock: None,
                error: LockError::Refused(reason),
            });
            return;
        }
        rec.up = true;
        self.sessions.insert(
            session,
            Session {
                client: client.chars().take(64).collect(),
                locks: BTreeSet::new(),
                reqs: ReqWindow::default(),
            },
        );
        fx.push(Effect::SessionOpened { session });
    }

    fn session_command(
        &mut self,
        cmd: &Command,
        fx: &mut Vec<Effect>,
    ) -> Result<(), (Option<LockId>, LockError)> {
        match cmd {
            Command::Lock {
                session,
                req,
                lockspace,
                resource,
                mode,
                flags,
            } => {
                validate_lockspace(lockspace).map_err(|m| (None, LockError::Invalid(m)))?;
                validate_resource(resource).map_err(|m| (None, LockError::Invalid(m)))?;
                check_flags(*flags)?;
                if self.sessions[session].locks.len() >= MAX_LOCKS_PER_SESSION {
                    return Err((None, LockError::TooManyLocks(MAX_LOCKS_PER_SESSION as u64)));
                }
                if self.locks.len() >= MAX_LOCKS_TOTAL {
                    return Err((None, LockError::TableFull(MAX_LOCKS_TOTAL as u64)));
                }
                self.new_lock(*session, *req, lockspace, resource, *mode, *flags, fx);
                Ok(())
            }
            Command::Convert {
                session,
                req,
                lock,
                mode,
                flags,
                lvb,
            } => {
                check_flags(*flags)?;
                self.convert(*session, *req, *lock, *mode, *flags, *lvb, fx)
            }
            Command::Unlock {
                session,
                req,
                lock,
                lvb,
            } => self.unlock(*session, *req, *lock, *lvb, fx),
            Command::Cancel { session, req, lock } => self.cancel(*session, *req, *lock, fx),
            Command::CancelRequest {
                session,
                req,
                target,
            } => {
                let lock = self.sessions[session]
                    .locks
                    .iter()
                    .find(|id| {
                        self.locks[*id]
                            .pending
                            .as_ref()
                            .is_some_and(|p| p.req == *target)
                    })
                    .copied()
                    .ok_or((None, LockError::NotPending))?;
                self.cancel(*session, *req, lock, fx)
            }
            Command::FenceAck { session, req, node } => {
                let rec = self
                    .nodes
                    .get_mut(node)
                    .ok_or((None, LockError::NodeNotDown(*node)))?;
                let has_orphans = self
                    .locks
                    .values()
                    .any(|l| l.orphaned && l.owner.node == *node);
                if rec.up && !has_orphans {
                    return Err((None, LockError::NodeNotDown(*node)));
                }
                rec.fenced = true;
                fx.push(Effect::Done {
                    session: *session,
                    req: *req,
                });
                self.regrant_all(fx);
                Ok(())
            }
            Command::RecoveryDone {
                session,
                req,
                node,
                lockspace,
            } => {
                let fenced = self.nodes.get(node).is_some_and(|n| n.fenced);
                let orphans = || {
                    self.locks.iter().filter(|(_, l)| {
                        l.orphaned && l.owner.node == *node && l.key.lockspace == *lockspace
                    })
                };
                // Orphans of a closed session need no fencing; any other orphan does (and
                // with nothing to purge, an unfenced node is refused as before).
                let closed_only =
                    orphans().next().is_some() && orphans().all(|(_, l)| l.closed_orphan);
                if !fenced && !closed_only {
                    return Err((None, LockError::NodeNotFenced(*node)));
                }
                let purge: Vec<LockId> = orphans().map(|(id, _)| *id).collect();
                for id in purge {
                    let lock = self.locks.remove(&id).expect("listed");
                    let res = self
                        .resources
                        .get_mut(&lock.key)
                        .expect("resource of a lock");
                    if lock.granted.is_some_and(Mode::writes_lvb) {
                        // The dead holder may have changed what the block describes.
                        res.lvb_valid = false;
                    }
                    res.forget(id);
                }
                fx.push(Effect::Done {
                    session: *session,
                    req: *req,
                });
                self.regrant_all(fx);
                Ok(())
            }
            _ => unreachable!("session_command called with a non-session command"),
        }
    }

    fn ctx<'a>(
        locks: &'a mut BTreeMap<LockId, Lock>,
        nodes: &'a BTreeMap<NodeId, NodeRecord>,
        last_token: &'a mut u64,
        effects: &'a mut Vec<Effect>,
    ) -> Ctx<'a> {
        Ctx {
            locks,
            nodes,
            last_token,
            effects,
        }
    }

    fn new_lock(
        &mut self,
        session: SessionId,
        req: ReqId,
        lockspace: &str,
        name: &[u8],
        mode: Mode,
        flags: Flags,
        fx: &mut Vec<Effect>,
    ) {
        let key = ResKey {
            lockspace: lockspace.to_string(),
            name: name.to_vec(),
        };
        self.next_lock_id += 1;
        let id = LockId(self.next_lock_id);
        let res = self.resources.entry(key.clone()).or_default();
        let mut ctx = Self::ctx(&mut self.locks, &self.nodes, &mut self.last_token, fx);
        let grantable = res.can_grant_new(&ctx, id, mode, flags);
        if !grantable && flags.contains(Flags::NOQUEUE) {
            if flags.contains(Flags::NOQUEUEBAST) {
                res.blocking_callbacks_for_noqueue(&mut ctx, mode, None);
            }
            if res.is_empty() {
                self.resources.remove(&key);
            }
            fx.push(Effect::Failed {
                session,
                req,
                lock: None,
                error: LockError::WouldBlock,
            });
            return;
        }
        ctx.locks.insert(
            id,
            Lock {
                owner: session,
                key,
                granted: None,
                pending: Some(Pending { req, mode, flags }),
                orphaned: false,
                persistent: flags.contains(Flags::PERSISTENT),
                closed_orphan: false,
                token: FencingToken(0),
                basts_sent: 0,
            },
        );
        self.sessions
            .get_mut(&session)
            .expect("checked by apply")
            .locks
            .insert(id);
        if grantable {
            res.grant(&mut ctx, id);
        } else {
            res.waiting.push(id);
        }
        res.grant_pending(&mut ctx);
    }

    fn owned(&self, session: SessionId, id: LockId) -> Result<&Lock, (Option<LockId>, LockError)> {
        let lock = self
            .locks
            .get(&id)
            .ok_or((Some(id), LockError::UnknownLock))?;
        if lock.owner != session {
            return Err((Some(id), LockError::NotOwner));
        }
        Ok(lock)
    }

    fn convert(
        &mut self,
        session: SessionId,
        req: ReqId,
        id: LockId,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
        fx: &mut Vec<Effect>,
    ) -> Result<(), (Option<LockId>, LockError)> {
        let lock = self.owned(session, id)?;
        if lock.pending.is_some() {
            return Err((Some(id), LockError::Busy));
        }
        let from = lock.granted.ok_or((Some(id), LockError::NotGranted))?;
        let key = lock.key.clone();
        let res = self.resources.get_mut(&key).expect("resource of a lock");
        if let Some(lvb) = lvb {
            if from.writes_lvb() && mode != Mode::EX && mode != from {
                res.lvb = lvb;
                res.lvb_valid = true;
            }
        }
        let mut ctx = Self::ctx(&mut self.locks, &self.nodes, &mut self.last_token, fx);
        let in_place = res.can_convert_in_place(&ctx, id, from, mode, flags);
        if !in_place && flags.contains(Flags::NOQUEUE) {
            if flags.contains(Flags::NOQUEUEBAST) {
                res.blocking_callbacks_for_noqueue(&mut ctx, mode, Some(id));
            }
            return Err((Some(id), LockError::WouldBlock));
        }
        ctx.locks.get_mut(&id).expect("owned").pending = Some(Pending { req, mode, flags });
        if in_place {
            res.grant(&mut ctx, id);
        } else {
            res.converting.push(id);
        }
        res.grant_pending(&mut ctx);
        Ok(())
    }

    fn unlock(
        &mut self,
        session: SessionId,
        req: ReqId,
        id: LockId,
        lvb: Option<Lvb>,
        fx: &mut Vec<Effect>,
    ) -> Result<(), (Option<LockId>, LockError)> {
        let lock = self.owned(session, id)?;
        let key = lock.key.clone();
        let held = lock.granted;
        if let Some(p) = &lock.pending {
            // Unlocking a lock with a request in flight cancels that request first.
            fx.push(Effect::Failed {
                session,
                req: p.req,
                lock: Some(id),
                error: LockError::Cancelled,
            });
        }
        let res = self.resources.get_mut(&key).expect("resource of a lock");
        if let (Some(lvb), Some(held)) = (lvb, held) {
            if held.writes_lvb() {
                res.lvb = lvb;
                res.lvb_valid = true;
            }
        }
        res.forget(id);
        self.locks.remove(&id);
        self.sessions
            .get_mut(&session)
            .expect("checked")
            .locks
            .remove(&id);
        fx.push(Effect::Unlocked {
            session,
            req,
            lock: id,
        });
        self.regrant(&key, fx);
        Ok(())
    }

    fn cancel(
        &mut self,
        session: SessionId,
        req: ReqId,
        id: LockId,
        fx: &mut Vec<Effect>,
    ) -> Result<(), (Option<LockId>, LockError)> {
        let lock = self.owned(session, id)?;
        let Some(p) = lock.pending.clone() else {
            return Err((Some(id), LockError::NotPending));
        };
        let key = lock.key.clone();
        let was_granted = lock.granted.is_some();
        let res = self.resources.get_mut(&key).expect("resource of a lock");
        fx.push(Effect::Failed {
            session,
            req: p.req,
            lock: Some(id),
            error: LockError::Cancelled,
        });
        if was_granted {
            res.converting.retain(|x| *x != id);
            self.locks.get_mut(&id).expect("owned").pending = None;
        } else {
            res.forget(id);
            self.locks.remove(&id);
            self.sessions
                .get_mut(&session)
                .expect("checked")
                .locks
                .remove(&id);
        }
        fx.push(Effect::Done { session, req });
        self.regrant(&key, fx);
        Ok(())
    }

    /// Ends a session. With `orphan`, granted locks stay held as orphans; otherwise every
    /// lock is released. Pending requests are dropped either way.
    fn end_session(&mut self, session: SessionId, orphan: bool) {
        let Some(s) = self.sessions.remove(&session) else {
            return;
        };
        for id in s.locks {
            let lock = self.locks.get_mut(&id).expect("session lock exists");
            let res = self
                .resources
                .get_mut(&lock.key)
                .expect("resource of a lock");
            lock.pending = None;
            res.converting.retain(|x| *x != id);
            res.waiting.retain(|x| *x != id);
            if lock.granted.is_some() && (orphan || lock.persistent) {
                lock.orphaned = true;
                lock.closed_orphan = !orphan;
            } else {
                res.forget(id);
                self.locks.remove(&id);
            }
        }
    }

    fn node_down(&mut self, node: NodeId, fenced: bool, fx: &mut Vec<Effect>) {
        let rec = self.nodes.entry(node).or_insert(NodeRecord {
            incarnation: 0,
            up: true,
            fenced: false,
        });
        if !rec.up {
            if fenced && !rec.fenced {
                rec.fenced = true;
                // RECOVERY requests may now pass this node's orphans.
                self.regrant_all(fx);
            }
            return;
        }
        rec.up = false;
        let doomed: Vec<SessionId> = self
            .sessions
            .keys()
            .filter(|s| s.node == node)
            .copied()
            .collect();
        // A node that held no sessions leaves nothing to protect: no fencing needed for it
        // to come back.
        rec.fenced = fenced || doomed.is_empty();
        for s in doomed {
            self.end_session(s, true);
            fx.push(Effect::SessionEnded {
                session: s,
                reason: EndReason::NodeDown,
            });
        }
        self.regrant_all(fx);
    }

    fn node_restart(&mut self, node: NodeId, incarnation: u64, fx: &mut Vec<Effect>) {
        self.closed_early
            .retain(|s| s.node != node || s.incarnation == incarnation);
        let doomed: Vec<SessionId> = self
            .sessions
            .keys()
            .filter(|s| s.node == node && s.incarnation != incarnation)
            .copied()
            .collect();
        for s in doomed {
            self.end_session(s, true);
            fx.push(Effect::SessionEnded {
                session: s,
                reason: EndReason::Restarted,
            });
        }
        let rec = self.nodes.entry(node).or_insert(NodeRecord {
            incarnation,
            up: true,
            fenced: true,
        });
        if rec.incarnation != incarnation {
            // Only the new incarnation's own proposal gets here; a down node that restarts
            // attests that its old clients are gone, as their sockets closed with the daemon.
            rec.incarnation = incarnation;
            rec.fenced = true;
        }
        rec.up = true;
        self.regrant_all(fx);
    }

    fn regrant(&mut self, key: &ResKey, fx: &mut Vec<Effect>) {
        let Some(res) = self.resources.get_mut(key) else {
            return;
        };
        let mut ctx = Self::ctx(&mut self.locks, &self.nodes, &mut self.last_token, fx);
        res.grant_pending(&mut ctx);
        if res.is_empty() {
            self.resources.remove(key);
        }
    }

    fn regrant_all(&mut self, fx: &mut Vec<Effect>) {
        let keys: Vec<ResKey> = self.resources.keys().cloned().collect();
        for key in keys {
            self.regrant(&key, fx);
        }
    }
}

fn check_flags(flags: Flags) -> Result<(), (Option<LockId>, LockError)> {
    if flags.is_valid() {
        Ok(())
    } else {
        Err((
            None,
            LockError::Invalid(format!("unknown flag bits {:#x}", flags.0)),
        ))
    }
}
