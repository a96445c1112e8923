//! Sans-IO core of replication state: what to do on connect, and how generations and
//! bitmaps change on missed writes and finished resyncs. Pure functions over the
//! superblock, bitmaps and the peer's `State`; the engine applies their results (and
//! persists them), and the seeded simulation in `sim.rs` drives exactly the same functions.

use tandem_common::NodeId;

use super::bitmap::DirtyBitmap;
use super::decide::{decide, resolve_split_brain, Decision, Generation, SbPolicy, SbSide};
use crate::meta::format::{Superblock, FLAG_CRASHED_HERE, FLAG_CRASHED_PRIMARY, FLAG_LOST_QUORUM};
use crate::proto::PeerState;
use crate::state::DiskState;

/// What this node does after the connect handshake with one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// In sync (or nothing to do yet): Established.
    Idle,
    /// We send: our bitmap for the peer (`use_bitmap`) plus these 4 MiB extents plus the
    /// peer's own changes (`peer_runs`; `None` = unknown, send everything), or the whole
    /// volume when none is given.
    Source {
        use_bitmap: bool,
        extents: Vec<u64>,
        peer_runs: Option<Vec<(u64, u64)>>,
    },
    /// The peer will send (SyncStart); stay Established until it does.
    AwaitSource,
    /// Disconnect and stay StandAlone until an operator acts.
    Refuse { reason: String, split_brain: bool },
}

/// Our side of a connect.
#[derive(Clone, Debug)]
pub struct Local {
    /// Our generation as seen by this peer (with our bitmap uuid for it).
    pub generation: Generation,
    /// `connect --discard-my-data` was given here.
    pub discard_my_data: bool,
    pub split_brain: SbSide,
    pub policy: SbPolicy,
    /// Our own activity log if we crashed as Primary (None with `generation.crashed` =
    /// unknown, e.g. lost quorum): as a source we must send those extents too, they may
    /// hold writes the peer never got.
    pub own_crashed_extents: Option<Vec<u64>>,
}

pub fn peer_generation(st: &PeerState) -> Generation {
    Generation {
        disk: st.disk,
        current: st.current_uuid,
        history: st.history_uuids,
        crashed: st.crashed_primary,
        bitmap: st.bitmap_uuid_for_you,
        dirty: st.changes_bytes > 0,
    }
}

/// The connect decision, including `--discard-my-data`, automatic split-brain recovery,
/// and the resync plan. Returns the plan and the rule that decided it.
/// The third value says whether a split brain was detected (resolved or not), for the
/// split-brain handler.
pub fn plan_connect(me: &Local, st: &PeerState, peer: NodeId) -> (Plan, &'static str, bool) {
    let peer_gen = peer_generation(st);
    let (mut decision, mut rule) = decide(&me.generation, &peer_gen);
    let split_brain = decision == Decision::SplitBrain
        && rule != "equal-current-both-dirty"
        && rule != "both-crashed-primary";
    match (me.discard_my_data, st.discard_my_data) {
        (true, true) => {
            return (
                Plan::Refuse {
                    reason: "both sides asked to discard their data (connect --discard-my-data on one node only)".into(),
                    split_brain: false,
                },
                "discard-my-data-both",
                false,
            )
        }
        (true, false) if peer_gen.current != 0 => (decision, rule) = (Decision::SyncTarget, "discard-my-data"),
        (false, true) if me.generation.current != 0 => {
            (decision, rule) = (Decision::SyncSource, "peer-discards-its-data")
        }
        _ => {}
    }
    // Same generation, both hold bits for the other: with equal currents neither side
    // wrote on its own (a writer mints when it loses a peer), so the bits are tracking for
    // third nodes; both copies agree on every other block. Resync the union of both
    // bitmaps from the lower node id rather than calling it a split brain.
    //
    // Why "same current generation" keeps meaning "same data, except blocks the newer
    // side holds bits for" with any number of nodes (it failed with four before: a node
    // reached the writer's generation through a third node while the writer kept writing
    // in it, and a stale side's bits then chose the direction here):
    // - a node that joins a generation makes its neighbours mint before their next write
    //   that misses a peer (`PeerMsg::Topology`, confirmed before the join completes);
    // - a resync target inherits the source's bitmaps for third peers
    //   (`inherit_third_peer`) instead of marking everything it received as news for them.
    // The seeded simulation (`sim.rs`) checks this with up to six nodes.
    if decision == Decision::SplitBrain && rule == "equal-current-both-dirty" {
        (decision, rule) = if me.split_brain.node_id < peer.0 {
            (Decision::BitmapSource, "equal-current-union-of-bitmaps")
        } else {
            (Decision::BitmapTarget, "equal-current-union-of-bitmaps")
        };
    }
    // Same generation, both crashed as Primary (a power loss of both, or a node that took
    // a crashed Primary's hot extents): neither side's hot extents hold an acknowledged
    // write the other lacks (protocol C put each on both), so either copy will do as long
    // as both end up with the same one — the lower node id sends both sets of extents.
    if decision == Decision::SplitBrain && rule == "both-crashed-primary" {
        (decision, rule) = if me.split_brain.node_id < peer.0 {
            (Decision::BitmapSource, "both-crashed-primary-union")
        } else {
            (Decision::BitmapTarget, "both-crashed-primary-union")
        };
    }
    if decision == Decision::SplitBrain {
        let theirs = SbSide {
            primary: st.role == crate::state::Role::Primary,
            changes_bytes: st.changes_bytes,
            node_id: peer.0,
            primary_at_loss: st.primary_at_loss,
        };
        let (resolved, policy_rule) = resolve_split_brain(me.policy, &me.split_brain, &theirs);
        match resolved {
            Decision::SyncSource | Decision::SyncTarget => {
                (decision, rule) = (resolved, policy_rule)
            }
            _ => {
                return (
                    Plan::Refuse {
                        reason: format!("split brain detected ({rule}; policy {policy_rule})"),
                        split_brain: true,
                    },
                    rule,
                    true,
                )
            }
        }
    }
    let mut plan = match decision {
        Decision::NoSync => Plan::Idle,
        // Another node is already syncing this peer; re-decide when it reports.
        Decision::SyncSource | Decision::BitmapSource if st.sync_target => Plan::Idle,
        Decision::SyncSource => Plan::Source {
            peer_runs: Some(Vec::new()),
            use_bitmap: false,
            // A crashed Primary at our generation needs only its hot extents.
            extents: match (rule, &st.crashed_extents) {
                ("peer-crashed-primary", Some(e)) => e.clone(),
                _ => Vec::new(),
            },
        },
        Decision::BitmapSource => Plan::Source {
            peer_runs: st.dirty_runs.clone(),
            use_bitmap: true,
            extents: if st.crashed_primary {
                st.crashed_extents.clone().unwrap_or_default()
            } else {
                Vec::new()
            },
        },
        Decision::SyncTarget | Decision::BitmapTarget => Plan::AwaitSource,
        Decision::SplitBrain => unreachable!("handled above"),
        Decision::Unrelated => Plan::Refuse {
            reason: format!("unrelated data: the generations share no history (rule {rule}); one side needs `tandemadm create-md --force` and a full sync"),
            split_brain: false,
        },
    };
    if let Plan::Source {
        use_bitmap,
        extents,
        ..
    } = &mut plan
    {
        if me.generation.crashed {
            match &me.own_crashed_extents {
                Some(own) => extents.extend(own.iter().copied()),
                None => {
                    // Unknown hot set: send everything.
                    *use_bitmap = false;
                    extents.clear();
                }
            }
        }
    }
    (plan, rule, split_brain)
}

/// Most runs a `State` carries before it says "too many" (`dirty_runs: None`).
pub const MAX_DIRTY_RUNS: usize = 16 * 1024;

/// Byte runs of a bitmap for `State::dirty_runs` (`None` if there are too many).
pub fn dirty_runs(bitmap: &DirtyBitmap) -> Option<Vec<(u64, u64)>> {
    let mut runs = Vec::new();
    let mut from = 0;
    while let Some((o, l)) = bitmap.next_run(from, u64::MAX) {
        if runs.len() == MAX_DIRTY_RUNS {
            return None;
        }
        runs.push((o, l));
        from = o + l;
    }
    Some(runs)
}

/// The blocks a resync sends: our bitmap (if used) plus extents plus the peer's own
/// changes, or everything (no bitmap and no extents, or the peer's changes unknown).
pub fn resync_work(
    bitmap: Option<&DirtyBitmap>,
    extents: &[u64],
    peer_runs: Option<&[(u64, u64)]>,
    volume_bytes: u64,
) -> DirtyBitmap {
    let mut work = bitmap
        .cloned()
        .unwrap_or_else(|| DirtyBitmap::new(volume_bytes));
    for e in extents {
        work.set_range(e * super::al::EXTENT_BYTES, super::al::EXTENT_BYTES);
    }
    for &(o, l) in peer_runs.unwrap_or_default() {
        work.set_range(o, l);
    }
    if (bitmap.is_none() && extents.is_empty()) || peer_runs.is_none() {
        work.set_all();
    }
    work
}

/// Before the first write some peers will miss: give each such peer a bitmap generation
/// (our current) and mint a new current. `connectivity_changed` forces a new current even
/// when every missing peer already has a bitmap: a missing peer may have caught up to our
/// current generation through a third node since, and must not mistake our new writes for
/// data it has. Returns true if the superblock changed.
pub fn assign_bitmap_generation(
    sb: &mut Superblock,
    missing: &[NodeId],
    fresh_uuid: u64,
    connectivity_changed: bool,
) -> bool {
    let current = sb.current_uuid;
    let mut minted = connectivity_changed && !missing.is_empty();
    for p in sb.peers.iter_mut() {
        if missing.contains(&p.node_id) && p.bitmap_uuid == 0 {
            p.bitmap_uuid = current;
            minted = true;
        }
    }
    if minted {
        sb.history_uuids = [current, sb.history_uuids[0]];
        sb.current_uuid = fresh_uuid;
    }
    minted
}

/// A node that *receives* writes (or a new generation) while some of its own peers are
/// missing tracks them too — the writer may not reach them either — but does not mint:
/// it gives those peers a bitmap generation (our current) only. True if it changed.
pub fn track_missing(sb: &mut Superblock, missing: &[NodeId]) -> bool {
    let current = sb.current_uuid;
    let mut changed = false;
    for p in sb.peers.iter_mut() {
        if missing.contains(&p.node_id) && p.bitmap_uuid == 0 && current != 0 {
            p.bitmap_uuid = current;
            changed = true;
        }
    }
    changed
}

/// Records our role in the slots of `peers` (see `PeerSlot::primary_at_loss`).
pub fn set_primary_at_loss(sb: &mut Superblock, peers: &[NodeId], primary: bool) {
    for p in sb.peers.iter_mut().filter(|p| peers.contains(&p.node_id)) {
        p.primary_at_loss = primary;
    }
}

/// Whether some of `missing` still need a bitmap generation.
pub fn needs_bitmap_generation(sb: &Superblock, missing: &[NodeId]) -> bool {
    sb.peers
        .iter()
        .any(|p| missing.contains(&p.node_id) && p.bitmap_uuid == 0)
}

/// The target of a finished resync from `view`'s sender now holds the sender's data, so a
/// third peer lacks relative to us what it lacks relative to the sender: add the sender's
/// bitmap for it to ours (`None` = everything) and take its bitmap generation for it
/// (0 = none: the sender was in sync with it). Our bits stay too (writes that reached us during the resync, tracked for that
/// peer); the blocks we received are not news to the peer unless the sender says so —
/// marking them all made resyncs cycle between four nodes and let a stale copy win.
pub fn inherit_third_peer(
    sb: &mut Superblock,
    bitmap: &mut DirtyBitmap,
    view: &crate::proto::ThirdPeerView,
) {
    inherit_bits(bitmap, view);
    inherit_bitmap_uuid(sb, view);
}

/// The bitmap half of `inherit_third_peer` (the engine persists it first).
pub fn inherit_bits(bitmap: &mut DirtyBitmap, view: &crate::proto::ThirdPeerView) {
    match &view.runs {
        Some(runs) => {
            for &(o, l) in runs {
                bitmap.set_range(o, l);
            }
        }
        None => bitmap.set_all(),
    }
}

/// The superblock half of `inherit_third_peer`.
pub fn inherit_bitmap_uuid(sb: &mut Superblock, view: &crate::proto::ThirdPeerView) {
    for p in sb.peers.iter_mut().filter(|p| p.node_id == view.node) {
        p.bitmap_uuid = view.bitmap_uuid;
    }
}

/// The source finished a resync to `peer`: it has everything, forget its bitmap generation.
pub fn finish_as_source(sb: &mut Superblock, peer: NodeId) {
    for p in sb.peers.iter_mut().filter(|p| p.node_id == peer) {
        p.bitmap_uuid = 0;
    }
}

/// Whether a resync that made us SyncTarget by `rule` moves our data forward along its
/// own lineage (the source's generation descends from ours). The others — discard-my-data,
/// split-brain recovery, lost writes — replace our data with a different branch.
pub fn target_keeps_lineage(rule: &str) -> bool {
    matches!(
        rule,
        "target-use-bitmap"
            | "local-outdated"
            | "local-crashed-primary"
            | "equal-current-peer-dirty-bitmap"
            | "equal-current-union-of-bitmaps"
            | "both-crashed-primary-union"
            | "local-current-in-peer-history"
            | "local-current-in-peer-history-use-bitmap"
            | "local-without-data"
    )
}

/// Whether a resync that made us SyncTarget by `rule` replaced data of ours that a third
/// peer may have got from us: a crashed Primary's unacknowledged writes, or a branch that
/// lost (see `target_keeps_lineage`). Then the received blocks are news for our other peers
/// — inheriting the source's view of them is not enough, it knows nothing of what we sent.
pub fn target_rolls_back(rule: &str) -> bool {
    matches!(rule, "local-crashed-primary" | "both-crashed-primary-union")
        || !target_keeps_lineage(rule)
}

/// Whether a resync that made us SyncTarget by `rule` is followed by
/// `mint_after_rollback`: we crashed as Primary ourselves (`FLAG_CRASHED_HERE` in our
/// flags before the resync finished) and took a survivor's copy of our hot extents,
/// rolling back writes nobody acknowledged.
pub fn mints_after_rollback(rule: &str, flags_before: u32) -> bool {
    rule == "local-crashed-primary" && flags_before & FLAG_CRASHED_HERE != 0
}

/// After `mints_after_rollback`: a new current generation, with a bitmap generation (our
/// old current) for every peer in `others` (every disk peer; the source, in sync, adopts
/// it through `Uuids`). Why: a third peer may hold the unacknowledged writes we
/// just rolled back, or may have copied another node's view that we are "in sync" with
/// it; kept at the old current, such a stale view still matched us and a later resync
/// trusted it (4-node gap (b) seeds 149, 1345, 8441). At a new generation every such peer
/// is older than us and is resynced from our bitmap, which holds the rolled-back blocks
/// (`target_rolls_back`) together with its own doubt bits for us. A generation minted by
/// a node that merely took a crashed Primary's hot extents (flagged crashed-primary too)
/// must not mint: the real writer may mint from the same generation, and two generations
/// minted from one parent are a split brain (see `FLAG_CRASHED_HERE`). The crashed writer
/// itself was the only writer of this generation, and the source adopts ours.
/// True if it minted (no peer besides the source: nobody can hold a stale view, and
/// nothing is done).
pub fn mint_after_rollback(
    sb: &mut Superblock,
    others: &[NodeId],
    source: NodeId,
    fresh_uuid: u64,
) -> bool {
    others.iter().any(|p| *p != source) && assign_bitmap_generation(sb, others, fresh_uuid, true)
}

/// The target finished a resync from `peer`: adopt its generations, become UpToDate, and
/// drop whatever we had recorded for that peer (it is overwritten now).
///
/// `keeps_lineage` false (see `target_keeps_lineage`): our data was replaced by another
/// branch, so our bitmap generations for third peers no longer name ancestors of our
/// current one. Kept, they would claim "that peer is at my bitmap generation and I am
/// newer" and make us the source of a peer that holds newer data (a Primary's
/// acknowledged writes). Forgotten, the next connect with those peers compares currents
/// and histories instead, and refuses when it cannot tell.
pub fn finish_as_target(
    sb: &mut Superblock,
    peer: NodeId,
    current: u64,
    history: [u64; 2],
    keeps_lineage: bool,
) {
    if !keeps_lineage {
        for p in sb.peers.iter_mut() {
            p.bitmap_uuid = 0;
        }
    }
    sb.current_uuid = current;
    sb.history_uuids = history;
    sb.disk_state = DiskState::UpToDate;
    sb.flags &= !(FLAG_CRASHED_PRIMARY | FLAG_CRASHED_HERE | FLAG_LOST_QUORUM);
    finish_as_source(sb, peer);
}

/// A connected peer minted a new generation (`PeerMsg::Uuids`) for the peers it misses:
/// track those at our current generation first (the writer may not reach them and neither
/// may we), then, if the two of us are in sync, adopt its generation. Engine and
/// simulation both go through here. True if the superblock changed.
pub fn receive_uuids(
    sb: &mut Superblock,
    missing: &[NodeId],
    in_sync: bool,
    current: u64,
    history: [u64; 2],
) -> bool {
    let tracked = track_missing(sb, missing);
    let adopted = in_sync && adopt_uuids(sb, current, history);
    tracked || adopted
}

/// A connected, in-sync peer minted a new generation: adopt it when it was minted from
/// ours (whatever the two numbers are: a second mint on top of one we adopted is the
/// newer one), or — when both minted from the same parent at once — the larger one, so
/// both sides converge on one generation.
pub fn adopt_uuids(sb: &mut Superblock, current: u64, history: [u64; 2]) -> bool {
    if sb.disk_state != DiskState::UpToDate || current == sb.current_uuid {
        return false;
    }
    if history[0] == sb.current_uuid || current > sb.current_uuid {
        sb.current_uuid = current;
        sb.history_uuids = history;
        true
    } else {
        false
    }
}
