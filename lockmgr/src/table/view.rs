//! Read-only views of the lock table (status, `tandem-lockctl locks`, tests) and the
//! structural invariant check the tests and the simulation run after every step.

use super::{Lock, LockTable, NodeRecord};
use crate::types::{FencingToken, LockId, Mode, SessionId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tandem_common::NodeId;

/// A read-only view of one lock for `tandem-lockctl locks`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockView {
    pub lock: LockId,
    pub owner: SessionId,
    pub granted: Option<Mode>,
    pub wanted: Option<Mode>,
    pub orphaned: bool,
    pub token: FencingToken,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceView {
    pub name: Vec<u8>,
    pub lvb_valid: bool,
    pub granted: Vec<LockView>,
    pub converting: Vec<LockView>,
    pub waiting: Vec<LockView>,
}

impl LockTable {
    pub fn last_token(&self) -> FencingToken {
        FencingToken(self.last_token)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn has_session(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeRecord> {
        &self.nodes
    }

    pub fn orphan_count(&self, node: NodeId) -> usize {
        self.locks
            .values()
            .filter(|l| l.orphaned && l.owner.node == node)
            .count()
    }

    pub fn lock(&self, id: LockId) -> Option<&Lock> {
        self.locks.get(&id)
    }

    pub fn lockspaces(&self) -> BTreeSet<String> {
        self.resources.keys().map(|k| k.lockspace.clone()).collect()
    }

    pub fn resources_in(&self, lockspace: &str) -> Vec<ResourceView> {
        let view = |id: &LockId| {
            let l = &self.locks[id];
            LockView {
                lock: *id,
                owner: l.owner,
                granted: l.granted,
                wanted: l.pending.as_ref().map(|p| p.mode),
                orphaned: l.orphaned,
                token: l.token,
            }
        };
        self.resources
            .iter()
            .filter(|(k, _)| k.lockspace == lockspace)
            .map(|(k, r)| ResourceView {
                name: k.name.clone(),
                lvb_valid: r.lvb_valid,
                granted: r.granted.iter().map(view).collect(),
                converting: r.converting.iter().map(view).collect(),
                waiting: r.waiting.iter().map(view).collect(),
            })
            .collect()
    }

    /// Checks structural invariants; used by tests and the simulation after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (key, res) in &self.resources {
            if res.is_empty() {
                return Err(format!("empty resource {key:?} kept"));
            }
            for id in &res.granted {
                let l = self.locks.get(id).ok_or(format!("granted {id} missing"))?;
                if l.granted.is_none() || &l.key != key {
                    return Err(format!("lock {id} in granted queue is not granted here"));
                }
            }
            for id in &res.converting {
                let l = self
                    .locks
                    .get(id)
                    .ok_or(format!("converting {id} missing"))?;
                if l.granted.is_none() || l.pending.is_none() || !res.granted.contains(id) {
                    return Err(format!("lock {id} in convert queue is inconsistent"));
                }
            }
            for id in &res.waiting {
                let l = self.locks.get(id).ok_or(format!("waiting {id} missing"))?;
                if l.granted.is_some() || l.pending.is_none() {
                    return Err(format!("lock {id} in wait queue is inconsistent"));
                }
            }
            // Live granted locks must be pairwise compatible; a passable orphan (fenced node or
            // closed session) may
            // coexist with a RECOVERY grant.
            for (i, a) in res.granted.iter().enumerate() {
                for b in &res.granted[i + 1..] {
                    let (la, lb) = (&self.locks[a], &self.locks[b]);
                    let fenced_orphan = |l: &Lock| {
                        l.orphaned
                            && (l.closed_orphan
                                || self.nodes.get(&l.owner.node).is_some_and(|n| n.fenced))
                    };
                    if fenced_orphan(la) || fenced_orphan(lb) {
                        continue;
                    }
                    if !la.granted.unwrap().compatible(lb.granted.unwrap()) {
                        return Err(format!("incompatible grants {a} and {b} on {key:?}"));
                    }
                }
            }
        }
        for (id, l) in &self.locks {
            if !l.orphaned {
                let s = self
                    .sessions
                    .get(&l.owner)
                    .ok_or(format!("lock {id} owned by a closed session"))?;
                if !s.locks.contains(id) {
                    return Err(format!("lock {id} missing from its session"));
                }
            } else if l.pending.is_some() {
                return Err(format!("orphan {id} has a pending request"));
            }
        }
        Ok(())
    }
}
