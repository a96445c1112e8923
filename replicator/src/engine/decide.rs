//! The reconnect decision: given both sides' disk state and generation identifiers, decide
//! whether and which way to resync — DRBD's `uuid_compare()` rules, named so the log can
//! say which rule decided. Pure and symmetric: `decide(a, b)` mirrors `decide(b, a)`.

use crate::state::DiskState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation {
    pub disk: DiskState,
    pub current: u64,
    pub history: [u64; 2],
    /// Stopped while Primary without demoting: may hold writes no peer acknowledged.
    pub crashed: bool,
    /// The generation our dirty bitmap for the other side counts from (0 = no bitmap).
    pub bitmap: u64,
    /// Our bitmap for the other side has blocks it may lack.
    pub dirty: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Same data: Established.
    NoSync,
    /// We hold the good data: full sync to the peer.
    SyncSource,
    /// The peer holds the good data.
    SyncTarget,
    /// The peer is exactly the generation our bitmap counts from: send only dirty blocks.
    BitmapSource,
    /// Mirror of `BitmapSource`.
    BitmapTarget,
    /// Both changed since they last shared a generation.
    SplitBrain,
    /// No common ancestry at all: refuse to connect.
    Unrelated,
}

impl Decision {
    pub fn mirror(self) -> Self {
        match self {
            Decision::SyncSource => Decision::SyncTarget,
            Decision::SyncTarget => Decision::SyncSource,
            Decision::BitmapSource => Decision::BitmapTarget,
            Decision::BitmapTarget => Decision::BitmapSource,
            other => other,
        }
    }
}

/// `newer`'s generation descends from `older`'s (`older`'s current is in `newer`'s
/// history): `newer`'s data had writes `older`'s copy lacks.
fn descends_from(newer: &Generation, older: &Generation) -> bool {
    older.current != 0 && newer.current != older.current && newer.history.contains(&older.current)
}

fn has_data(g: &Generation) -> bool {
    matches!(
        g.disk,
        DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
    ) && g.current != 0
}

/// Whether `newer`'s bitmap for `older` counts from a generation at or before `older`'s
/// current on `newer`'s lineage (current, then history, newest first). A bitmap
/// generation is always an ancestor of the current one (it is set to the current one, or
/// inherited with the source's lineage), so one no longer in the history is older still.
fn bitmap_covers(newer: &Generation, older: &Generation) -> bool {
    let lineage = [newer.current, newer.history[0], newer.history[1]];
    let pos = |g: u64| lineage.iter().position(|&x| x == g && x != 0);
    match (pos(older.current), pos(newer.bitmap)) {
        (Some(p), Some(b)) => b >= p,
        (Some(_), None) => newer.bitmap != 0,
        (None, _) => false,
    }
}

/// Returns the decision and the name of the rule that made it.
pub fn decide(me: &Generation, peer: &Generation) -> (Decision, &'static str) {
    // A Diskless side (detached after a disk error) or a Failed disk (on-io-error =
    // pass-on) has nothing to sync to or from until the disk is replaced.
    let unusable = |d: DiskState| matches!(d, DiskState::Diskless | DiskState::Failed);
    if unusable(me.disk) || unusable(peer.disk) {
        return (Decision::NoSync, "diskless-or-failed");
    }
    let (mine, theirs) = (has_data(me), has_data(peer));
    // Bitmap rules first: they also resume an interrupted bitmap resync, where the target
    // is Inconsistent but still at the generation our bitmap counts from.
    let i_track_peer = mine && me.bitmap != 0 && me.bitmap == peer.current;
    let peer_tracks_me = theirs && peer.bitmap != 0 && peer.bitmap == me.current;
    // Same generation, both crashed as Primary (or took a crashed Primary's hot extents):
    // bits on either side are doubt about unacknowledged writes, and deciding by them
    // lets doubtful copies chase each other around a ring of nodes; the lower node id
    // sends the union instead (`both-crashed-primary`, below), a total order.
    let both_crashed_equal =
        mine && theirs && me.current == peer.current && me.crashed && peer.crashed;
    match (i_track_peer, peer_tracks_me) {
        (true, false) if !both_crashed_equal => {
            return (Decision::BitmapSource, "source-use-bitmap")
        }
        (false, true) if !both_crashed_equal => {
            return (Decision::BitmapTarget, "target-use-bitmap")
        }
        _ => {}
    }
    match (mine, theirs) {
        (false, false) => return (Decision::NoSync, "both-without-data"),
        // A side without data (invalidated, or a resync cut short) still names the
        // generation its data belonged to. A copy older than that lacks writes it had —
        // acknowledged ones, possibly held nowhere else now — so it is no source for it;
        // a peer at that generation or newer is (or `primary --force` on this one).
        (true, false) if descends_from(peer, me) => {
            return (Decision::NoSync, "peer-without-data-newer-than-us")
        }
        (false, true) if descends_from(me, peer) => {
            return (Decision::NoSync, "local-without-data-newer-than-peer")
        }
        (true, false) => return (Decision::SyncSource, "peer-without-data"),
        (false, true) => return (Decision::SyncTarget, "local-without-data"),
        (true, true) => {}
    }
    if me.current == peer.current {
        // Same generation: an Outdated side still takes the other's copy.
        return match (me.disk, peer.disk) {
            (DiskState::UpToDate, DiskState::Outdated) => (Decision::SyncSource, "peer-outdated"),
            (DiskState::Outdated, DiskState::UpToDate) => (Decision::SyncTarget, "local-outdated"),
            _ => match (me.crashed, peer.crashed) {
                (true, false) => (Decision::SyncTarget, "local-crashed-primary"),
                (false, true) => (Decision::SyncSource, "peer-crashed-primary"),
                (true, true) => (Decision::SplitBrain, "both-crashed-primary"),
                // Same generation, but one side wrote blocks the other never got (the
                // other caught up to this generation through a third node): send them.
                (false, false) => match (me.dirty, peer.dirty) {
                    (true, false) => (Decision::BitmapSource, "equal-current-dirty-bitmap"),
                    (false, true) => (Decision::BitmapTarget, "equal-current-peer-dirty-bitmap"),
                    (true, true) => (Decision::SplitBrain, "equal-current-both-dirty"),
                    (false, false) => (Decision::NoSync, "equal-current"),
                },
            },
        };
    }
    let mine_newer = me.history.contains(&peer.current);
    let theirs_newer = peer.history.contains(&me.current);
    match (mine_newer, theirs_newer) {
        // The newer side's bitmap for the other counts from a generation at or before
        // the other's current: it holds every block written since, so it is enough (a
        // node that caught up through a third node sits between the two).
        (true, false) if bitmap_covers(me, peer) => {
            return (
                Decision::BitmapSource,
                "peer-current-in-local-history-use-bitmap",
            )
        }
        (false, true) if bitmap_covers(peer, me) => {
            return (
                Decision::BitmapTarget,
                "local-current-in-peer-history-use-bitmap",
            )
        }
        (true, false) => return (Decision::SyncSource, "peer-current-in-local-history"),
        (false, true) => return (Decision::SyncTarget, "local-current-in-peer-history"),
        _ => {}
    }
    // One side failed writes it had already applied (crash or lost quorum): it takes the
    // other side's copy, provided the two share ancestry.
    let related = me.history.iter().chain(peer.history.iter()).any(|h| {
        *h != 0
            && (me.history.contains(h) || *h == me.current)
            && (peer.history.contains(h) || *h == peer.current)
    });
    if related {
        match (me.crashed, peer.crashed) {
            (true, false) => return (Decision::SyncTarget, "local-lost-writes"),
            (false, true) => return (Decision::SyncSource, "peer-lost-writes"),
            _ => {}
        }
    }
    if me.history[0] != 0 && me.history[0] == peer.history[0] {
        (Decision::SplitBrain, "common-parent")
    } else if me
        .history
        .iter()
        .any(|h| *h != 0 && peer.history.contains(h))
    {
        (Decision::SplitBrain, "common-ancestor")
    } else {
        (Decision::Unrelated, "unrelated-data")
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use DiskState::*;

    /// A generation with no bitmap, not crashed (also used by `sync`'s tests).
    pub(in crate::engine) fn g(disk: DiskState, current: u64, history: [u64; 2]) -> Generation {
        Generation {
            disk,
            current,
            history,
            crashed: false,
            bitmap: 0,
            dirty: false,
        }
    }

    /// An invalidated node (no usable data, but still at the generation its data had)
    /// is not resynced from a copy older than that generation: the older copy lacks
    /// writes the invalidated node had, and the writer that also had them may be gone
    /// (`resilience::an_invalidated_node_never_takes_a_copy_that_lacks_writes_it_tracked`).
    /// A peer at its generation, or a newer one, is a source; so is any peer for a node
    /// that never had data.
    #[test]
    fn a_node_without_data_is_not_resynced_from_an_older_copy() {
        let (a, b) = (0xA, 0xB);
        let invalidated = g(Inconsistent, b, [a, 0]);
        let older = g(UpToDate, a, [0, 0]);
        let same = g(UpToDate, b, [a, 0]);
        assert_eq!(
            decide(&older, &invalidated),
            (Decision::NoSync, "peer-without-data-newer-than-us")
        );
        assert_eq!(
            decide(&invalidated, &older),
            (Decision::NoSync, "local-without-data-newer-than-peer")
        );
        assert_eq!(decide(&same, &invalidated).0, Decision::SyncSource);
        assert_eq!(decide(&invalidated, &same).0, Decision::SyncTarget);
        let fresh = g(Inconsistent, 0, [0, 0]);
        assert_eq!(decide(&older, &fresh).0, Decision::SyncSource);
        let forced = g(UpToDate, 0xF, [a, 0]);
        assert_eq!(decide(&forced, &invalidated).0, Decision::SyncSource);
    }

    /// A node that caught up through a third node sits between the writer's bitmap
    /// generation for it and the writer's current: a bitmap resync, not a full one. A
    /// bitmap counting from a generation after the peer's current is not enough.
    #[test]
    fn a_bitmap_from_an_older_generation_covers_a_peer_in_between() {
        let (a, b, c) = (0xA, 0xB, 0xC);
        let mut writer = g(UpToDate, c, [b, a]);
        writer.bitmap = a;
        let caught_up = g(UpToDate, b, [a, 0]);
        assert_eq!(
            decide(&writer, &caught_up),
            (
                Decision::BitmapSource,
                "peer-current-in-local-history-use-bitmap"
            )
        );
        assert_eq!(
            decide(&caught_up, &writer),
            (
                Decision::BitmapTarget,
                "local-current-in-peer-history-use-bitmap"
            )
        );
        writer.bitmap = 0x9; // older than the history kept
        assert_eq!(
            decide(&writer, &caught_up),
            (
                Decision::BitmapSource,
                "peer-current-in-local-history-use-bitmap"
            )
        );
        writer.bitmap = c;
        let older = g(UpToDate, b, [a, 0]);
        assert_eq!(
            decide(&writer, &older),
            (Decision::SyncSource, "peer-current-in-local-history")
        );
    }

    #[test]
    fn rules() {
        let cases = [
            (
                g(Inconsistent, 0, [0, 0]),
                g(Inconsistent, 0, [0, 0]),
                Decision::NoSync,
            ),
            (
                g(UpToDate, 5, [0, 0]),
                g(Inconsistent, 0, [0, 0]),
                Decision::SyncSource,
            ),
            (
                g(UpToDate, 5, [0, 0]),
                g(Inconsistent, 5, [0, 0]),
                Decision::SyncSource,
            ),
            (
                g(UpToDate, 5, [0, 0]),
                g(UpToDate, 5, [0, 0]),
                Decision::NoSync,
            ),
            (
                g(UpToDate, 6, [5, 0]),
                g(UpToDate, 5, [0, 0]),
                Decision::SyncSource,
            ),
            (
                g(UpToDate, 5, [1, 0]),
                g(UpToDate, 6, [5, 1]),
                Decision::SyncTarget,
            ),
            (
                g(UpToDate, 6, [5, 0]),
                g(UpToDate, 7, [5, 0]),
                Decision::SplitBrain,
            ),
            (
                g(UpToDate, 6, [5, 0]),
                g(UpToDate, 9, [8, 0]),
                Decision::Unrelated,
            ),
            (
                g(UpToDate, 5, [0, 0]),
                g(Outdated, 5, [0, 0]),
                Decision::SyncSource,
            ),
        ];
        let mut crashed = g(UpToDate, 5, [0, 0]);
        crashed.crashed = true;
        let mut tracking = g(UpToDate, 6, [5, 0]);
        tracking.bitmap = 5;
        let resuming = g(Inconsistent, 5, [0, 0]);
        let mut lost = g(UpToDate, 7, [5, 0]);
        lost.crashed = true;
        let mut both = g(UpToDate, 7, [5, 0]);
        both.bitmap = 5;
        // Both crashed at one generation: the bits one holds for the other do not pick
        // the direction (both-crashed-primary, resolved by node id in plan_connect).
        let mut doubting = g(UpToDate, 5, [1, 0]);
        doubting.crashed = true;
        let mut doubting_tracker = doubting;
        doubting_tracker.bitmap = 5;
        doubting_tracker.dirty = true;
        let cases = cases.into_iter().chain([
            (crashed, g(UpToDate, 5, [0, 0]), Decision::SyncTarget),
            (tracking, g(UpToDate, 5, [0, 0]), Decision::BitmapSource),
            (tracking, resuming, Decision::BitmapSource),
            (tracking, both, Decision::SplitBrain),
            (lost, g(UpToDate, 8, [5, 0]), Decision::SyncTarget),
            (doubting_tracker, doubting, Decision::SplitBrain),
        ]);
        for (a, b, want) in cases {
            assert_eq!(decide(&a, &b).0, want, "{a:?} vs {b:?}");
            assert_eq!(decide(&b, &a).0, want.mirror(), "mirror {b:?} vs {a:?}");
        }
    }
}

/// One side of a split brain, for the automatic recovery policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SbSide {
    pub primary: bool,
    /// Bytes this side changed since the split (its bitmap for the other side).
    pub changes_bytes: u64,
    pub node_id: u8,
    /// This side was Primary when the two last were connected (before the split).
    pub primary_at_loss: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SbPolicy {
    pub zero: tandem_common::config::AfterSb0Pri,
    pub one: tandem_common::config::AfterSb1Pri,
}

/// DRBD's after-sb-0pri / 1pri / 2pri: `SyncSource` = our data survives, `SyncTarget` =
/// ours is discarded, `SplitBrain` = disconnect and wait for a human. Symmetric:
/// `resolve(p, a, b)` mirrors `resolve(p, b, a)`.
pub fn resolve_split_brain(
    policy: SbPolicy,
    me: &SbSide,
    peer: &SbSide,
) -> (Decision, &'static str) {
    use tandem_common::config::{AfterSb0Pri, AfterSb1Pri};
    let keep_me = |me_wins: bool| {
        if me_wins {
            Decision::SyncSource
        } else {
            Decision::SyncTarget
        }
    };
    let least_changes = |me: &SbSide, peer: &SbSide| -> (Decision, &'static str) {
        if me.changes_bytes == peer.changes_bytes {
            (
                keep_me(me.node_id < peer.node_id),
                "discard-least-changes(tie:node-id)",
            )
        } else {
            (
                keep_me(me.changes_bytes > peer.changes_bytes),
                "discard-least-changes",
            )
        }
    };
    let zero = |me: &SbSide, peer: &SbSide| -> (Decision, &'static str) {
        match policy.zero {
            AfterSb0Pri::Disconnect => (Decision::SplitBrain, "after-sb-0pri=disconnect"),
            AfterSb0Pri::DiscardZeroChanges => match (me.changes_bytes, peer.changes_bytes) {
                (0, 0) => (
                    keep_me(me.node_id < peer.node_id),
                    "discard-zero-changes(tie:node-id)",
                ),
                (0, _) => (Decision::SyncTarget, "discard-zero-changes"),
                (_, 0) => (Decision::SyncSource, "discard-zero-changes"),
                _ => (Decision::SplitBrain, "discard-zero-changes(both-changed)"),
            },
            AfterSb0Pri::DiscardLeastChanges => least_changes(me, peer),
            AfterSb0Pri::DiscardYoungerPrimary | AfterSb0Pri::DiscardOlderPrimary => {
                // DRBD: the side that was Primary before the split is the older Primary;
                // if that does not tell them apart, fall back to discard-least-changes.
                if me.primary_at_loss == peer.primary_at_loss {
                    let (d, _) = least_changes(me, peer);
                    let rule = if policy.zero == AfterSb0Pri::DiscardYoungerPrimary {
                        "discard-younger-primary(undecided:least-changes)"
                    } else {
                        "discard-older-primary(undecided:least-changes)"
                    };
                    return (d, rule);
                }
                if policy.zero == AfterSb0Pri::DiscardYoungerPrimary {
                    (keep_me(me.primary_at_loss), "discard-younger-primary")
                } else {
                    (keep_me(!me.primary_at_loss), "discard-older-primary")
                }
            }
        }
    };
    match (me.primary, peer.primary) {
        (false, false) => zero(me, peer),
        (true, true) => (Decision::SplitBrain, "after-sb-2pri=disconnect"),
        (me_primary, _) => match policy.one {
            AfterSb1Pri::Disconnect => (Decision::SplitBrain, "after-sb-1pri=disconnect"),
            AfterSb1Pri::DiscardSecondary => (keep_me(me_primary), "discard-secondary"),
            AfterSb1Pri::Consensus => {
                let (d, rule) = zero(me, peer);
                let discards_secondary = match d {
                    Decision::SyncSource => me_primary,
                    Decision::SyncTarget => !me_primary,
                    _ => false,
                };
                if discards_secondary {
                    (d, rule)
                } else {
                    (Decision::SplitBrain, "consensus(no-agreement)")
                }
            }
        },
    }
}

#[cfg(test)]
mod sb_tests {
    use super::*;
    use tandem_common::config::{AfterSb0Pri, AfterSb1Pri};

    #[test]
    fn every_policy_is_symmetric_and_sane() {
        let zeros = [
            AfterSb0Pri::Disconnect,
            AfterSb0Pri::DiscardZeroChanges,
            AfterSb0Pri::DiscardLeastChanges,
            AfterSb0Pri::DiscardYoungerPrimary,
            AfterSb0Pri::DiscardOlderPrimary,
        ];
        let ones = [
            AfterSb1Pri::Disconnect,
            AfterSb1Pri::Consensus,
            AfterSb1Pri::DiscardSecondary,
        ];
        let sides = |p, c, n, t| SbSide {
            primary: p,
            changes_bytes: c,
            node_id: n,
            primary_at_loss: t,
        };
        for zero in zeros {
            for one in ones {
                let policy = SbPolicy { zero, one };
                for a in [
                    sides(false, 0, 1, false),
                    sides(true, 4096, 1, true),
                    sides(false, 8192, 1, true),
                    sides(false, 4096, 1, false),
                ] {
                    for b in [
                        sides(false, 0, 2, false),
                        sides(true, 4096, 2, true),
                        sides(false, 12288, 2, false),
                        sides(false, 4096, 2, true),
                    ] {
                        let (x, _) = resolve_split_brain(policy, &a, &b);
                        let (y, _) = resolve_split_brain(policy, &b, &a);
                        assert_eq!(x, y.mirror(), "{policy:?} {a:?} {b:?}");
                        // A Primary is never discarded automatically.
                        if a.primary && !b.primary {
                            assert_ne!(x, Decision::SyncTarget, "{policy:?} discarded a Primary");
                        }
                    }
                }
            }
        }
        let p = SbPolicy {
            zero: AfterSb0Pri::DiscardLeastChanges,
            one: AfterSb1Pri::DiscardSecondary,
        };
        assert_eq!(
            resolve_split_brain(
                p,
                &sides(false, 4096, 1, false),
                &sides(false, 8192, 2, false)
            )
            .0,
            Decision::SyncTarget
        );
        assert_eq!(
            resolve_split_brain(
                p,
                &sides(true, 4096, 1, false),
                &sides(false, 8192, 2, false)
            )
            .0,
            Decision::SyncSource
        );
        assert_eq!(
            resolve_split_brain(p, &sides(true, 1, 1, false), &sides(true, 1, 2, false)).0,
            Decision::SplitBrain
        );
    }

    #[test]
    fn younger_and_older_primary_compare_who_was_primary_before_the_split() {
        let side = |changes_bytes, node_id, primary_at_loss| SbSide {
            primary: false,
            changes_bytes,
            node_id,
            primary_at_loss,
        };
        let policy = |zero| SbPolicy {
            zero,
            one: AfterSb1Pri::Disconnect,
        };
        // n1 was Primary before the split and changed less; n2 was promoted during it.
        let (old, young) = (side(4096, 1, true), side(8192, 2, false));
        let younger = policy(AfterSb0Pri::DiscardYoungerPrimary);
        let older = policy(AfterSb0Pri::DiscardOlderPrimary);
        assert_eq!(
            resolve_split_brain(younger, &old, &young),
            (Decision::SyncSource, "discard-younger-primary")
        );
        assert_eq!(
            resolve_split_brain(younger, &young, &old),
            (Decision::SyncTarget, "discard-younger-primary")
        );
        assert_eq!(
            resolve_split_brain(older, &old, &young),
            (Decision::SyncTarget, "discard-older-primary")
        );
        // Neither (or both) was Primary before: discard-least-changes decides.
        let (a, b) = (side(4096, 1, false), side(8192, 2, false));
        assert_eq!(
            resolve_split_brain(younger, &a, &b),
            (
                Decision::SyncTarget,
                "discard-younger-primary(undecided:least-changes)"
            )
        );
        let (a, b) = (side(4096, 1, true), side(8192, 2, true));
        assert_eq!(resolve_split_brain(older, &a, &b).0, Decision::SyncTarget);
    }
}
