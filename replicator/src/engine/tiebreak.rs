//! Diskless tiebreakers: members of a resource without a disk. They store no data and get
//! no writes, but they vote for quorum, so two disk nodes plus one tiebreaker survive the
//! loss of either disk node (DRBD's diskless quorum tiebreaker).
//!
//! A vote that only counts connections would be unsafe in two ways, and the rules here
//! close both:
//! - After a link cut between the disk nodes, both may still see the tiebreaker and both
//!   would have a majority. A Primary mints a new generation at its first write without
//!   the other disk node; the tiebreaker *adopts* the first such generation it hears of
//!   and vouches only for a node at the generation it holds. The other node's write then
//!   lacks quorum and fails (or waits): one side wins, never both.
//! - A stale disk node (it missed writes) must not gain quorum with the tiebreaker alone.
//!   It is at an older generation than the one the tiebreaker adopted, so no vouch. A
//!   tiebreaker that restarted knows nothing and vouches for nobody until it has seen
//!   every disk node connected and agreeing (then nobody is stale).
//!
//! A disk node acknowledges a write that relies on a tiebreaker's vote only after the
//! tiebreaker reported the write's generation back (`vouches`), so an acknowledged write
//! is always on a node the tiebreaker will keep vouching for.

use crate::state::DiskState;

/// What the tiebreaker knows of one disk node (from its `State` and `Uuids` messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskNode {
    pub connected: bool,
    pub disk: DiskState,
    pub current: u64,
    pub history: [u64; 2],
}

/// The newest generation of the data the tiebreaker knows of (0 = unknown), given its
/// previous one and what the disk nodes report now.
pub fn adopt(known: u64, nodes: &[DiskNode]) -> u64 {
    let up: Vec<&DiskNode> = nodes
        .iter()
        .filter(|n| n.connected && n.disk == DiskState::UpToDate && n.current != 0)
        .collect();
    // Every disk node connected, UpToDate and equal: nobody is stale, start from there.
    if !nodes.is_empty() && up.len() == nodes.len() && up.iter().all(|n| n.current == up[0].current)
    {
        return up[0].current;
    }
    if known == 0 {
        return 0;
    }
    // A node that moved on from what we know (it minted, or took a newer copy): the
    // first one we hear of wins; a second branch from `known` does not match it.
    up.iter()
        .find(|n| n.current != known && n.history.contains(&known))
        .map_or(known, |n| n.current)
}

/// What a disk node knows of one tiebreaker (from the tiebreaker's `State`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tiebreaker {
    pub connected: bool,
    /// The generation the tiebreaker vouches for (0 = none).
    pub known: u64,
}

/// A disk node's own generation, as the vouching rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Own {
    pub disk: DiskState,
    pub current: u64,
    pub history: [u64; 2],
}

/// Whether a tiebreaker's vote counts for a disk node now.
pub fn vouches(t: &Tiebreaker, me: &Own) -> bool {
    t.connected && me.disk == DiskState::UpToDate && me.current != 0 && t.known == me.current
}

/// Whether it will once our latest generation reaches it: it holds one we moved on from.
pub fn will_vouch(t: &Tiebreaker, me: &Own) -> bool {
    vouches(t, me)
        || (t.connected
            && me.disk == DiskState::UpToDate
            && t.known != 0
            && me.history.contains(&t.known))
}

/// Votes of a disk node: itself, `disk_votes` disk peers and the tiebreakers that vouch
/// (`now`), and what it reaches once the tiebreakers catch up with us (`soon`).
pub fn votes(disk_votes: usize, tiebreakers: &[Tiebreaker], me: &Own) -> (usize, usize) {
    let now = tiebreakers.iter().filter(|t| vouches(t, me)).count();
    let soon = tiebreakers.iter().filter(|t| will_vouch(t, me)).count();
    (1 + disk_votes + now, 1 + disk_votes + soon)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(connected: bool, current: u64, history: [u64; 2]) -> DiskNode {
        DiskNode {
            connected,
            disk: DiskState::UpToDate,
            current,
            history,
        }
    }

    #[test]
    fn a_fresh_tiebreaker_learns_only_from_every_disk_node_agreeing() {
        // One node alone (the other may be newer): nothing.
        assert_eq!(
            adopt(0, &[node(true, 7, [0, 0]), node(false, 0, [0, 0])]),
            0
        );
        // Disagreeing (a resync is pending): nothing.
        assert_eq!(adopt(0, &[node(true, 7, [0, 0]), node(true, 5, [0, 0])]), 0);
        // A disk node not UpToDate: nothing.
        let mut n2 = node(true, 7, [0, 0]);
        n2.disk = DiskState::Inconsistent;
        assert_eq!(adopt(0, &[node(true, 7, [0, 0]), n2]), 0);
        // All agree.
        assert_eq!(adopt(0, &[node(true, 7, [0, 0]), node(true, 7, [0, 0])]), 7);
        // And that resets a stale view, too.
        assert_eq!(adopt(3, &[node(true, 7, [0, 0]), node(true, 7, [0, 0])]), 7);
    }

    #[test]
    fn the_first_branch_wins_and_a_stale_node_gets_no_vouch() {
        // Link cut between 1 and 2, both see the tiebreaker; 1 minted 8 on top of 7.
        let k = adopt(7, &[node(true, 8, [7, 0]), node(true, 7, [0, 0])]);
        assert_eq!(k, 8);
        // 2 mints 9 on top of 7 too late: 8 stays.
        assert_eq!(adopt(k, &[node(true, 8, [7, 0]), node(true, 9, [7, 0])]), 8);
        let t = Tiebreaker {
            connected: true,
            known: 8,
        };
        let own = |disk, current, history| Own {
            disk,
            current,
            history,
        };
        assert!(vouches(&t, &own(DiskState::UpToDate, 8, [7, 0])));
        let second = own(DiskState::UpToDate, 9, [7, 0]);
        assert!(
            !vouches(&t, &second) && !will_vouch(&t, &second),
            "second branch"
        );
        let stale = own(DiskState::UpToDate, 7, [0, 0]);
        assert!(
            !vouches(&t, &stale) && !will_vouch(&t, &stale),
            "stale node"
        );
        assert!(!vouches(&t, &own(DiskState::Outdated, 8, [7, 0])));
        let gone = Tiebreaker {
            connected: false,
            known: 8,
        };
        assert!(!will_vouch(&gone, &own(DiskState::UpToDate, 8, [7, 0])));
        let nothing = Tiebreaker {
            connected: true,
            known: 0,
        };
        assert!(!will_vouch(&nothing, &own(DiskState::UpToDate, 0, [0, 0])));
    }

    #[test]
    fn two_disk_nodes_and_one_tiebreaker_survive_either_loss() {
        let t = Tiebreaker {
            connected: true,
            known: 8,
        };
        let me = |current, history| Own {
            disk: DiskState::UpToDate,
            current,
            history,
        };
        // Majority of 3 is 2: the survivor at the vouched generation has it.
        assert_eq!(votes(0, std::slice::from_ref(&t), &me(8, [7, 0])), (2, 2));
        // We minted 9 and the tiebreaker has not confirmed yet: worth waiting for.
        assert_eq!(votes(0, std::slice::from_ref(&t), &me(9, [8, 7])), (1, 2));
        // It confirmed another branch: no point waiting.
        assert_eq!(votes(0, std::slice::from_ref(&t), &me(10, [7, 0])), (1, 1));
        // A restarted tiebreaker (knows nothing) helps nobody.
        let fresh = Tiebreaker {
            connected: true,
            known: 0,
        };
        assert_eq!(votes(0, &[fresh], &me(8, [7, 0])), (1, 1));
        // Everyone connected: the tiebreaker is not needed.
        assert_eq!(votes(1, &[], &me(8, [7, 0])), (2, 2));
    }
}
