//! One resource's grant, convert and wait queues and the DLM grant rules
//! (`_can_be_granted` / `grant_pending_locks` in fs/dlm/lock.c, VAXcluster chapter 6).
//!
//! Ordering: conversions always go before new requests; new requests are strictly FIFO;
//! a conversion is granted in place when it is compatible with every granted lock and every
//! queued conversion (unless QUECVT); queued conversions are granted FIFO-compatibly (a later
//! conversion may pass an earlier one only when it is compatible with the earlier one's
//! wanted mode), so none can be postponed indefinitely.

use super::{Effect, Lock, NodeRecord};
use crate::types::{FencingToken, Flags, LockId, Lvb, Mode, LVB_BYTES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tandem_common::NodeId;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Resource {
    pub lvb: Lvb,
    /// False after a PW/EX holder died without writing the block back (DLM VALNOTVALID).
    pub lvb_valid: bool,
    pub granted: Vec<LockId>,
    pub converting: Vec<LockId>,
    pub waiting: Vec<LockId>,
}

impl Default for Resource {
    fn default() -> Self {
        Self {
            lvb: [0; LVB_BYTES],
            lvb_valid: true,
            granted: Vec::new(),
            converting: Vec::new(),
            waiting: Vec::new(),
        }
    }
}

/// Shared, mutable context the grant rules need besides the resource itself.
pub struct Ctx<'a> {
    pub locks: &'a mut BTreeMap<LockId, Lock>,
    pub nodes: &'a BTreeMap<NodeId, NodeRecord>,
    pub last_token: &'a mut u64,
    pub effects: &'a mut Vec<Effect>,
}

/// True when `weaker` never conflicts with anything `stronger` does not already conflict with:
/// moving from `stronger` to `weaker` can be granted without asking anyone.
pub fn is_weaker_or_equal(weaker: Mode, stronger: Mode) -> bool {
    Mode::ALL
        .iter()
        .all(|m| !stronger.compatible(*m) || weaker.compatible(*m))
}

impl Resource {
    pub fn is_empty(&self) -> bool {
        self.granted.is_empty() && self.converting.is_empty() && self.waiting.is_empty()
    }

    /// Whether `mode` (for lock `me`) fits beside every granted lock except `me` itself,
    /// honouring the orphan rules: any orphan blocks non-RECOVERY requests; a RECOVERY
    /// request ignores orphans of fenced nodes and of closed sessions only.
    fn fits_granted(&self, ctx: &Ctx, me: LockId, mode: Mode, flags: Flags) -> bool {
        let recovery = flags.contains(Flags::RECOVERY);
        for id in &self.granted {
            if *id == me {
                continue;
            }
            let other = &ctx.locks[id];
            let held = other.granted.expect("granted queue holds granted locks");
            if other.orphaned {
                if !recovery {
                    return false;
                }
                let fenced = ctx.nodes.get(&other.owner.node).is_some_and(|n| n.fenced);
                if fenced || other.closed_orphan {
                    continue;
                }
            }
            if !held.compatible(mode) {
                return false;
            }
        }
        true
    }

    fn fits_conversions(&self, ctx: &Ctx, upto: usize, mode: Mode) -> bool {
        self.converting[..upto].iter().all(|id| {
            let wanted = ctx.locks[id].pending.as_ref().expect("converting").mode;
            wanted.compatible(mode)
        })
    }

    /// A brand-new request: granted now only if nothing is queued and it fits.
    /// A RECOVERY request on a resource with orphans jumps the queues: the requests queued
    /// there wait for the very recovery it performs (DLM grants recovery locks first too).
    pub fn can_grant_new(&self, ctx: &Ctx, me: LockId, mode: Mode, flags: Flags) -> bool {
        let queues_clear = self.converting.is_empty() && self.waiting.is_empty();
        (queues_clear || self.recovery_jumps(ctx, flags)) && self.fits_granted(ctx, me, mode, flags)
    }

    fn recovery_jumps(&self, ctx: &Ctx, flags: Flags) -> bool {
        flags.contains(Flags::RECOVERY) && self.granted.iter().any(|id| ctx.locks[id].orphaned)
    }

    /// A conversion asked for now (not yet queued).
    pub fn can_convert_in_place(
        &self,
        ctx: &Ctx,
        me: LockId,
        from: Mode,
        mode: Mode,
        flags: Flags,
    ) -> bool {
        // Lowering a lock can never hurt anyone; DLM grants it at once, even under orphans.
        if is_weaker_or_equal(mode, from) {
            return true;
        }
        if flags.contains(Flags::QUECVT) && !self.converting.is_empty() {
            return false;
        }
        self.fits_granted(ctx, me, mode, flags)
            && self.fits_conversions(ctx, self.converting.len(), mode)
    }

    /// Grants one lock (new or converted) and emits its completion.
    pub fn grant(&mut self, ctx: &mut Ctx, id: LockId) {
        let lock = ctx.locks.get_mut(&id).expect("lock exists");
        let pending = lock.pending.take().expect("grant of a pending request");
        if lock.granted.is_none() {
            self.granted.push(id);
        }
        if lock.granted != Some(pending.mode) {
            lock.basts_sent = 0;
        }
        lock.granted = Some(pending.mode);
        *ctx.last_token += 1;
        lock.token = FencingToken(*ctx.last_token);
        ctx.effects.push(Effect::Granted {
            session: lock.owner,
            req: pending.req,
            lock: id,
            mode: pending.mode,
            token: lock.token,
            lvb: self.lvb,
            lvb_valid: self.lvb_valid,
        });
    }

    /// Grants whatever the queues allow, breaks conversion deadlocks, then sends blocking
    /// callbacks to holders that stand in the way of what is still queued.
    pub fn grant_pending(&mut self, ctx: &mut Ctx) {
        loop {
            let mut progressed = false;
            for i in 0..self.converting.len() {
                let id = self.converting[i];
                let p = ctx.locks[&id].pending.as_ref().expect("converting").clone();
                let from = ctx.locks[&id].granted.expect("converting lock is granted");
                if is_weaker_or_equal(p.mode, from)
                    || (self.fits_granted(ctx, id, p.mode, p.flags)
                        && self.fits_conversions(ctx, i, p.mode))
                {
                    self.converting.remove(i);
                    self.grant(ctx, id);
                    progressed = true;
                    break;
                }
            }
            if !progressed {
                if let Some(victim) = self
                    .conversion_deadlock_victim(ctx)
                    .or_else(|| self.conversion_blocking_recovery(ctx))
                {
                    self.converting.retain(|id| *id != victim);
                    let lock = ctx.locks.get_mut(&victim).expect("victim exists");
                    let p = lock.pending.take().expect("victim was converting");
                    ctx.effects.push(Effect::Failed {
                        session: lock.owner,
                        req: p.req,
                        lock: Some(victim),
                        error: super::LockError::Deadlock,
                    });
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        if self.converting.is_empty() {
            while let Some(&id) = self.waiting.first() {
                let p = ctx.locks[&id].pending.as_ref().expect("waiting").clone();
                if !self.fits_granted(ctx, id, p.mode, p.flags) {
                    break;
                }
                self.waiting.remove(0);
                self.grant(ctx, id);
            }
        }
        // Queued RECOVERY requests may pass blocked ordinary ones (see `can_grant_new`).
        let mut i = 0;
        while i < self.waiting.len() {
            let id = self.waiting[i];
            let p = ctx.locks[&id].pending.as_ref().expect("waiting").clone();
            if self.recovery_jumps(ctx, p.flags) && self.fits_granted(ctx, id, p.mode, p.flags) {
                self.waiting.remove(i);
                self.grant(ctx, id);
            } else {
                i += 1;
            }
        }
        self.send_blocking_callbacks(ctx);
    }

    /// Wait-for graph over queued conversions: X waits for Y when Y's granted mode conflicts
    /// with X's wanted mode, or when Y is queued ahead of X with a conflicting wanted mode.
    /// A cycle can never resolve by itself (each holder waits to be granted before it lets
    /// go), so the latest-queued conversion on the cycle fails with `Deadlock`, as in DLM.
    fn conversion_deadlock_victim(&self, ctx: &Ctx) -> Option<LockId> {
        let n = self.converting.len();
        let waits_for = |x: usize, y: usize| -> bool {
            if x == y {
                return false;
            }
            let lx = &ctx.locks[&self.converting[x]];
            let ly = &ctx.locks[&self.converting[y]];
            let want_x = lx.pending.as_ref().expect("converting").mode;
            let held_y = ly.granted.expect("converting lock is granted");
            let want_y = ly.pending.as_ref().expect("converting").mode;
            !held_y.compatible(want_x) || (y < x && !want_y.compatible(want_x))
        };
        // Small queues: a reachability closure is cheap and simple to get right.
        for start in (0..n).rev() {
            let mut seen = vec![false; n];
            let mut stack = vec![start];
            while let Some(x) = stack.pop() {
                for (y, seen_y) in seen.iter_mut().enumerate() {
                    if waits_for(x, y) {
                        if y == start {
                            return Some(self.converting[start]);
                        }
                        if !*seen_y {
                            *seen_y = true;
                            stack.push(y);
                        }
                    }
                }
            }
        }
        None
    }

    /// A queued conversion that waits for the resource's orphans to go, on a lock that a
    /// queued RECOVERY request waits for. The orphans go only when that recovery is done
    /// (recovery-done after the journal replay it guards), so neither can ever be granted:
    /// the conversion fails with `Deadlock`, its holder keeps the old mode and releases it,
    /// as after any conversion deadlock. (A survivor converting its cached `meta` PR to EX
    /// to write, while its own recovery thread waits for `meta` EX to replay a dead node's
    /// journal.)
    fn conversion_blocking_recovery(&self, ctx: &Ctx) -> Option<LockId> {
        let recovery_wants: Vec<Mode> = self
            .waiting
            .iter()
            .filter_map(|id| {
                let p = ctx.locks[id].pending.as_ref().expect("waiting");
                self.recovery_jumps(ctx, p.flags).then_some(p.mode)
            })
            .collect();
        if recovery_wants.is_empty() {
            return None;
        }
        self.converting.iter().copied().find(|id| {
            let lock = &ctx.locks[id];
            let p = lock.pending.as_ref().expect("converting");
            let held = lock.granted.expect("converting lock is granted");
            // Only RECOVERY requests pass orphans: any other conversion waits for them.
            !p.flags.contains(Flags::RECOVERY)
                && !self.fits_granted(ctx, *id, p.mode, p.flags)
                && recovery_wants.iter().any(|m| !held.compatible(*m))
        })
    }

    fn send_blocking_callbacks(&mut self, ctx: &mut Ctx) {
        let queued: Vec<(LockId, Mode)> = self
            .converting
            .iter()
            .chain(self.waiting.iter())
            .map(|id| (*id, ctx.locks[id].pending.as_ref().expect("queued").mode))
            .collect();
        for (waiter, wanted) in queued {
            for holder in &self.granted {
                if *holder == waiter {
                    continue;
                }
                let lock = ctx.locks.get_mut(holder).expect("granted lock exists");
                let held = lock.granted.expect("granted");
                let bit = 1u8 << (wanted as u8);
                if lock.orphaned || held.compatible(wanted) || lock.basts_sent & bit != 0 {
                    continue;
                }
                lock.basts_sent |= bit;
                ctx.effects.push(Effect::Blocking {
                    session: lock.owner,
                    lock: *holder,
                    wanted,
                });
            }
        }
    }

    /// A `NOQUEUE | NOQUEUEBAST` request for `wanted` failed: tell every holder in its way,
    /// each time (the request is gone, so there is no "already told" to remember).
    /// `converting` is the caller's own lock when it was a conversion (not told).
    pub fn blocking_callbacks_for_noqueue(
        &self,
        ctx: &mut Ctx,
        wanted: Mode,
        converting: Option<LockId>,
    ) {
        for holder in self.granted.iter().filter(|h| Some(**h) != converting) {
            let lock = &ctx.locks[holder];
            let held = lock.granted.expect("granted");
            if lock.orphaned || held.compatible(wanted) {
                continue;
            }
            ctx.effects.push(Effect::Blocking {
                session: lock.owner,
                lock: *holder,
                wanted,
            });
        }
    }

    /// Removes a lock from every queue (the caller removes it from the lock map).
    pub fn forget(&mut self, id: LockId) {
        self.granted.retain(|x| *x != id);
        self.converting.retain(|x| *x != id);
        self.waiting.retain(|x| *x != id);
    }
}
