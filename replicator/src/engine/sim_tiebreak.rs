//! Two disk nodes and one diskless tiebreaker under `quorum = majority`, both disk nodes
//! Primary (the worst case: failover or allow-two-primaries), driven through seeded random
//! sequences of link cuts and heals, writes, tiebreaker restarts and disk-node crashes.
//! Writes go through the same functions as the engine: `assign_bitmap_generation` to mint,
//! `receive_uuids` on the peer, `tiebreak::adopt` on the tiebreaker and `tiebreak::votes`
//! for the quorum check; a write is acknowledged only with a majority.
//!
//! Invariant (split-brain safety): every generation in which some node acknowledged a
//! write lies on one line of descent — never two branches that both acknowledged writes,
//! which no resync could merge without losing one side's acknowledged data.
//!
//! `TANDEM_SIM_SEEDS` sets the number of sequences (default 2000, × 40 steps).

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_common::NodeId;

use super::core::{assign_bitmap_generation, receive_uuids};
use super::tiebreak::{adopt, votes, DiskNode, Own, Tiebreaker};
use crate::meta::format::Superblock;
use crate::state::DiskState;

const NEEDED: usize = 2; // majority of three members

struct Disk {
    sb: Superblock,
    up: bool,
    /// A connection came or went since our last new generation (engine: same flag).
    conn_changed: bool,
}

struct Model {
    disks: [Disk; 2],
    /// Links A–B, A–T, B–T.
    ab: bool,
    at: bool,
    bt: bool,
    /// The generation the tiebreaker vouches for (0 = none; lost on restart).
    known: u64,
    /// child generation -> the one it was minted from.
    parent: BTreeMap<u64, u64>,
    /// Generations in which some node acknowledged a write.
    acked: Vec<u64>,
    rng: StdRng,
    trace: Vec<String>,
}

fn disk(me: u8) -> Disk {
    Disk {
        sb: super::sim::superblock(NodeId(me), 2, 1 << 20, 1, [0, 0]),
        up: true,
        conn_changed: false,
    }
}

impl Model {
    fn new(seed: u64) -> Self {
        Model {
            disks: [disk(1), disk(2)],
            ab: true,
            at: true,
            bt: true,
            // Both disk nodes connected and agreeing at the start: it knows generation 1.
            known: 1,
            parent: BTreeMap::new(),
            acked: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            trace: Vec::new(),
        }
    }

    fn link_to_t(&self, i: usize) -> bool {
        self.disks[i].up && if i == 0 { self.at } else { self.bt }
    }

    fn ab_up(&self) -> bool {
        self.ab && self.disks[0].up && self.disks[1].up
    }

    /// The tiebreaker takes in what the connected disk nodes report (their `State`s).
    fn tiebreaker_listens(&mut self) {
        let nodes: Vec<DiskNode> = (0..2)
            .map(|i| DiskNode {
                connected: self.link_to_t(i),
                disk: self.disks[i].sb.disk_state,
                current: self.disks[i].sb.current_uuid,
                history: self.disks[i].sb.history_uuids,
            })
            .collect();
        self.known = adopt(self.known, &nodes);
    }

    fn is_ancestor(&self, old: u64, mut g: u64) -> bool {
        loop {
            if g == old {
                return true;
            }
            match self.parent.get(&g) {
                Some(&p) => g = p,
                None => return false,
            }
        }
    }

    fn write(&mut self, i: usize) {
        let o = 1 - i;
        if !self.disks[i].up || self.disks[i].sb.disk_state != DiskState::UpToDate {
            return;
        }
        let peer_connected = self.ab_up();
        let missing: Vec<NodeId> = if peer_connected {
            vec![]
        } else {
            vec![self.disks[o].sb.node_id]
        };
        let before = self.disks[i].sb.current_uuid;
        let fresh = self.rng.gen::<u64>() | 1;
        let changed = self.disks[i].conn_changed && !missing.is_empty();
        if assign_bitmap_generation(&mut self.disks[i].sb, &missing, fresh, changed) {
            self.parent.insert(self.disks[i].sb.current_uuid, before);
            self.disks[i].conn_changed = false;
            if peer_connected {
                let (c, h) = (
                    self.disks[i].sb.current_uuid,
                    self.disks[i].sb.history_uuids,
                );
                receive_uuids(&mut self.disks[o].sb, &missing, true, c, h);
            }
        }
        // The new generation reaches the tiebreaker (if connected) before the quorum check.
        self.tiebreaker_listens();
        let me = Own {
            disk: self.disks[i].sb.disk_state,
            current: self.disks[i].sb.current_uuid,
            history: self.disks[i].sb.history_uuids,
        };
        let t = Tiebreaker {
            connected: self.link_to_t(i),
            known: self.known,
        };
        let (now, _) = votes(usize::from(peer_connected), &[t], &me);
        let g = me.current;
        if now < NEEDED {
            self.trace
                .push(format!("n{} write in {g:x}: no quorum ({now})", i + 1));
            return;
        }
        for &h in &self.acked {
            assert!(
                self.is_ancestor(h, g) || self.is_ancestor(g, h),
                "split brain: n{} acknowledged a write in {g:x}, on another branch than {h:x}",
                i + 1
            );
        }
        self.acked.push(g);
        self.trace.push(format!("n{} write in {g:x}: acked", i + 1));
    }

    /// A and B connect: the older adopts the newer generation (a resync); two branches
    /// stay apart (split brain: the operator discards the side that acked nothing).
    fn connect_ab(&mut self) {
        let (a, b) = (self.disks[0].sb.current_uuid, self.disks[1].sb.current_uuid);
        let (src, dst) = if self.is_ancestor(b, a) {
            (0, 1)
        } else if self.is_ancestor(a, b) {
            (1, 0)
        } else {
            // Diverged: the side with acknowledged writes of its own since the split
            // survives (the invariant allows at most one such side).
            let own_acked = |me: u64, other: u64| {
                self.acked
                    .iter()
                    .any(|&h| self.is_ancestor(h, me) && !self.is_ancestor(h, other))
            };
            if own_acked(b, a) {
                (1, 0)
            } else {
                (0, 1)
            }
        };
        let (c, h) = (
            self.disks[src].sb.current_uuid,
            self.disks[src].sb.history_uuids,
        );
        self.disks[dst].sb.current_uuid = c;
        self.disks[dst].sb.history_uuids = h;
        for d in &mut self.disks {
            d.sb.peers[0].bitmap_uuid = 0;
            d.conn_changed = true;
        }
    }

    fn step(&mut self) {
        let was_ab = self.ab_up();
        match self.rng.gen_range(0..100) {
            0..=29 => {
                let i = self.rng.gen_range(0..2);
                self.write(i);
            }
            30..=59 => {
                let l = self.rng.gen_range(0..3);
                let v = self.rng.gen_bool(0.5);
                match l {
                    0 => self.ab = v,
                    1 => self.at = v,
                    _ => self.bt = v,
                }
                self.trace.push(format!("link {l} -> {v}"));
            }
            60..=69 => {
                self.known = 0;
                self.trace.push("tiebreaker restarted".into());
            }
            70..=84 => {
                let i = self.rng.gen_range(0..2);
                self.disks[i].up = !self.disks[i].up;
                self.disks[i].conn_changed = true;
                self.trace
                    .push(format!("n{} up={}", i + 1, self.disks[i].up));
            }
            _ => {}
        }
        let now_ab = self.ab_up();
        if was_ab != now_ab {
            for d in &mut self.disks {
                d.conn_changed = true;
            }
            if now_ab {
                self.connect_ab();
            }
        }
        self.tiebreaker_listens();
    }
}

#[test]
fn a_tiebreaker_never_lets_two_branches_acknowledge_writes() {
    let seeds: u64 = std::env::var("TANDEM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    for seed in 0..seeds {
        let mut m = Model::new(seed);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for _ in 0..40 {
                m.step();
            }
        }));
        if let Err(e) = result {
            eprintln!(
                "tiebreaker simulation failed: seed {seed}\n{}",
                m.trace.join("\n")
            );
            std::panic::resume_unwind(e);
        }
    }
}
