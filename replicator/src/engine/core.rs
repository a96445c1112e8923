//! Sans-IO core of replication state: what to do on connect, and how generations and
//! bitmaps change on missed writes and finished resyncs. Pure functions over the
//! superblock, bitmaps and the peer's `State`; the engine applies their results (and
//! persists them), and the seeded simulation in `sim.rs` drives exactly the same functions.

use tandem_common::NodeId;

use super::bitmap::DirtyBitmap;
use super::decide::{decide, resolve_split_brain, Decision, Generation, SbPolicy, SbSide};
use crate::meta::format::{Superblock, FLAG_CRASHED_PRIMARY, FLAG_LOST_QUORUM};
use crate::proto::PeerState;
use crate::state::DiskState;

/// What this node does after the connect handshake with one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// In sync (or nothing to do yet): Established.
    Idle,
    /// We send: our bitmap for the peer (`use_bitmap`) plus these 4 MiB extents, or the
    /// whole volume when neither is given.
    Source { use_bitmap: bool, extents: Vec<u64> },
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
}

pub fn peer_generation(st: &PeerState) -> Generation {
    Generation {
        disk: st.disk,
        current: st.current_uuid,
        history: st.history_uuids,
        crashed: st.crashed_primary,
        bitmap: st.bitmap_uuid_for_you,
    }
}

/// The connect decision, including `--discard-my-data`, automatic split-brain recovery,
/// and the resync plan. Returns the plan and the rule that decided it.
/// The third value says whether a split brain was detected (resolved or not), for the
/// split-brain handler.
pub fn plan_connect(me: &Local, st: &PeerState, peer: NodeId) -> (Plan, &'static str, bool) {
    let peer_gen = peer_generation(st);
    let (mut decision, mut rule) = decide(&me.generation, &peer_gen);
    let split_brain = decision == Decision::SplitBrain;
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
    if decision == Decision::SplitBrain {
        let theirs = SbSide {
            primary: st.role == crate::state::Role::Primary,
            changes_bytes: st.changes_bytes,
            node_id: peer.0,
            primary_since_ms: st.primary_since_ms,
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
    let plan = match decision {
        Decision::NoSync => Plan::Idle,
        // Another node is already syncing this peer; re-decide when it reports.
        Decision::SyncSource | Decision::BitmapSource if st.sync_target => Plan::Idle,
        Decision::SyncSource => Plan::Source {
            use_bitmap: false,
            // A crashed Primary at our generation needs only its hot extents.
            extents: match (rule, &st.crashed_extents) {
                ("peer-crashed-primary", Some(e)) => e.clone(),
                _ => Vec::new(),
            },
        },
        Decision::BitmapSource => Plan::Source {
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
    (plan, rule, split_brain)
}

/// The blocks a resync sends: the bitmap (if used) plus extents, or everything.
pub fn resync_work(
    bitmap: Option<&DirtyBitmap>,
    extents: &[u64],
    volume_bytes: u64,
) -> DirtyBitmap {
    let mut work = bitmap
        .cloned()
        .unwrap_or_else(|| DirtyBitmap::new(volume_bytes));
    for e in extents {
        work.set_range(e * super::al::EXTENT_BYTES, super::al::EXTENT_BYTES);
    }
    if bitmap.is_none() && extents.is_empty() {
        work.set_all();
    }
    work
}

/// Before the first write some peers will miss: give each such peer a bitmap generation
/// (our current) and mint a new current. Returns true if the superblock changed.
pub fn assign_bitmap_generation(sb: &mut Superblock, missing: &[NodeId], fresh_uuid: u64) -> bool {
    let current = sb.current_uuid;
    let mut minted = false;
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

/// Whether some of `missing` still need a bitmap generation.
pub fn needs_bitmap_generation(sb: &Superblock, missing: &[NodeId]) -> bool {
    sb.peers
        .iter()
        .any(|p| missing.contains(&p.node_id) && p.bitmap_uuid == 0)
}

/// The source finished a resync to `peer`: it has everything, forget its bitmap generation.
pub fn finish_as_source(sb: &mut Superblock, peer: NodeId) {
    for p in sb.peers.iter_mut().filter(|p| p.node_id == peer) {
        p.bitmap_uuid = 0;
    }
}

/// The target finished a resync from `peer`: adopt its generations, become UpToDate, and
/// drop whatever we had recorded for that peer (it is overwritten now).
pub fn finish_as_target(sb: &mut Superblock, peer: NodeId, current: u64, history: [u64; 2]) {
    sb.current_uuid = current;
    sb.history_uuids = history;
    sb.disk_state = DiskState::UpToDate;
    sb.flags &= !(FLAG_CRASHED_PRIMARY | FLAG_LOST_QUORUM);
    finish_as_source(sb, peer);
}

/// A connected, in-sync Primary minted a new generation: adopt it if newer.
pub fn adopt_uuids(sb: &mut Superblock, current: u64, history: [u64; 2]) -> bool {
    if current > sb.current_uuid && sb.disk_state == DiskState::UpToDate {
        sb.current_uuid = current;
        sb.history_uuids = history;
        true
    } else {
        false
    }
}
