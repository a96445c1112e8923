//! Seeded deterministic simulation of 3- and 5-node lock-manager clusters: the real
//! `NodeCore` (raft-rs RawNode + lock table) over an in-memory network with loss, delay,
//! one- and two-way partitions, crash/restart with volatile disk caches, and membership
//! changes (a crashed node is removed, wiped, restarted empty and added back).
//!
//! The history checker asserts, at every grant, that no two live clients hold incompatible
//! modes on one resource; after a final healed phase, that every request completed (progress
//! with a majority up, which also needs every blocking callback to have been delivered, since
//! clients only give up cached locks when called back), that clients and the replicated
//! table agree on every grant (no lost grant), and that replicas at the same index agree.
//!
//! `TANDEM_SIM_SEED=N` replays one seed (3 and 5 nodes); `TANDEM_SIM_SEEDS=N` (or `A..B`)
//! chooses the seeds; `TANDEM_SIM_TRACE=1` prints the history.

use raft::prelude::Message;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use tandem_common::NodeId;
use tandem_lockmgr::log_cache::LogCache;
use tandem_lockmgr::mem_sink::{MemDisk, MemSink};
use tandem_lockmgr::node::{CoreConfig, MemberChange, NodeCore, Probe};
use tandem_lockmgr::table::{Command, Effect, LockError};
use tandem_lockmgr::types::{Flags, LockId, Mode, ReqId, SessionId};

const LS: &str = "sim:fs";
const RESOURCES: usize = 3;
const CLIENTS_PER_NODE: usize = 2;
const CHAOS_TICKS: u64 = 1200;
const FINAL_TICKS: u64 = 1200;

enum Payload {
    Raft(Message),
    Probe(Probe),
}

struct Envelope {
    from: u8,
    to: u8,
    payload: Payload,
}

#[derive(Clone, Debug, PartialEq)]
enum CState {
    NoSession,
    Opening,
    Ready,
    Requesting {
        req: ReqId,
        res: usize,
        mode: Mode,
    },
    Holding {
        lock: LockId,
        res: usize,
        mode: Mode,
        release_at: Option<u64>,
    },
    Releasing {
        req: ReqId,
    },
}

struct Client {
    node: u8,
    session: Option<SessionId>,
    state: CState,
    next_req: u64,
}

/// Membership of a node, driven by the harness like an operator would: a crashed node is
/// removed, its disk wiped, then it is started empty (`--join`) and added back.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Membership {
    Member,
    Removing,
    Removed,
    Adding,
}

struct SimNode {
    core: Option<NodeCore<MemSink>>,
    membership: Membership,
    last_member_change: u64,
    /// The leader's applied index when the removal was seen applied: a leader that shows
    /// the node as a voter again must have applied past it (a stale leader may not have
    /// applied the removal yet).
    removed_at_index: u64,
    disk: MemDisk,
    restart_at: u64,
    restarts: u64,
    session_seq: u64,
    last_admin: u64,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    now: u64,
    cfg_template: CoreConfig,
    nodes: Vec<SimNode>,
    clients: Vec<Client>,
    inflight: BTreeMap<(u64, u64), Envelope>,
    seq: u64,
    /// Directed links that drop everything: (from, to).
    cut: BTreeSet<(u8, u8)>,
    heal_at: u64,
    loss: f64,
    chaos: bool,
    grants: u64,
    basts: u64,
    trace: bool,
}

impl Sim {
    fn new(seed: u64, n: u8) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(n) << 56));
        let voters: Vec<u64> = (1..=u64::from(n)).collect();
        let mut cfg = CoreConfig::new(NodeId(1), 10, 2);
        cfg.snapshot_every_entries = rng.gen_range(50..400);
        cfg.quorum_fencing = rng.gen_bool(0.7);
        let nodes = (1..=n)
            .map(|_| SimNode {
                core: None,
                membership: Membership::Member,
                last_member_change: 0,
                removed_at_index: 0,
                disk: MemDisk::new(LogCache::bootstrap(&voters)),
                restart_at: 0,
                restarts: 0,
                session_seq: 0,
                last_admin: 0,
            })
            .collect();
        let clients = (1..=n)
            .flat_map(|node| {
                (0..CLIENTS_PER_NODE).map(move |_| Client {
                    node,
                    session: None,
                    state: CState::NoSession,
                    next_req: 0,
                })
            })
            .collect();
        let loss = [0.0, 0.01, 0.05][rng.gen_range(0..3)];
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            cfg_template: cfg,
            nodes,
            clients,
            inflight: BTreeMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            heal_at: 0,
            loss,
            chaos: true,
            grants: 0,
            basts: 0,
            trace: std::env::var_os("TANDEM_SIM_TRACE").is_some(),
        };
        for id in 1..=n {
            sim.start(id);
        }
        sim
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "simulation seed {} ({} nodes) failed at tick {}: {what}\n  replay: TANDEM_SIM_SEED={} cargo test -p tandem-lockmgr --test simulation",
            self.seed,
            self.nodes.len(),
            self.now,
            self.seed
        );
    }

    fn start(&mut self, id: u8) {
        let node = &mut self.nodes[usize::from(id - 1)];
        node.restarts += 1;
        let mut cfg = self.cfg_template.clone();
        cfg.id = NodeId(id);
        let min = 10 + 4 * usize::from(id - 1) % 15 + self.rng.gen_range(0..4);
        cfg.election_ticks_range = Some((min, min + 1));
        let image = node.disk.crash_image();
        let core = NodeCore::new(cfg, image, node.disk.sink(), node.restarts * 1_000_000)
            .unwrap_or_else(|e| panic!("seed {}: node {id} cannot start: {e}", self.seed));
        node.core = Some(core);
    }

    /// Restarts a crashed node; a removed one comes back with a wiped disk and is added.
    fn start_or_rejoin(&mut self, id: u8) {
        let i = usize::from(id - 1);
        match self.nodes[i].membership {
            Membership::Member | Membership::Adding => self.start(id),
            // Stays down until the removal is applied; but removing a down node can need
            // that very node (raft-rs applies configurations at commit, so a survivor may
            // still count it), so after the chaos phase it comes back as an operator would.
            Membership::Removing if self.chaos => {}
            Membership::Removing => self.start(id),
            Membership::Removed => {
                self.nodes[i].disk = MemDisk::new(LogCache::default());
                self.nodes[i].membership = Membership::Adding;
                self.nodes[i].last_member_change = 0;
                self.start(id);
            }
        }
    }

    /// Proposes pending membership changes through some live node and notices when the
    /// leader has applied them.
    fn drive_membership(&mut self) {
        let n = self.nodes.len() as u8;
        let Some(leader) = (1..=n).find(|id| {
            self.nodes[usize::from(id - 1)]
                .core
                .as_ref()
                .is_some_and(|c| c.is_leader())
        }) else {
            return;
        };
        let status = self.nodes[usize::from(leader - 1)]
            .core
            .as_ref()
            .expect("up")
            .status();
        for id in 1..=n {
            let i = usize::from(id - 1);
            let voter = status.voters.contains(&NodeId(id));
            let change = match self.nodes[i].membership {
                Membership::Removing if !voter => {
                    if self.trace {
                        eprintln!("t={} {id} removed; voters {:?}", self.now, status.voters);
                    }
                    if self.up(id) {
                        self.crash(id); // the operator stops it before wiping its disk
                    }
                    self.nodes[i].membership = Membership::Removed;
                    self.nodes[i].removed_at_index = status.applied_index;
                    None
                }
                Membership::Adding
                    if voter && status.applied_index > self.nodes[i].removed_at_index =>
                {
                    if self.trace {
                        eprintln!("t={} {id} added; voters {:?}", self.now, status.voters);
                    }
                    self.nodes[i].membership = Membership::Member;
                    None
                }
                Membership::Removing => Some(MemberChange::Remove(NodeId(id))),
                // A stale leader may still list the node; only propose through one that has
                // applied the removal.
                Membership::Adding if status.applied_index > self.nodes[i].removed_at_index => {
                    Some(MemberChange::AddVoter(NodeId(id)))
                }
                _ => None,
            };
            if let Some(change) = change {
                if self.now.saturating_sub(self.nodes[i].last_member_change) >= 60 {
                    self.nodes[i].last_member_change = self.now;
                    let session = SessionId {
                        node: NodeId(leader),
                        incarnation: 0,
                        seq: 0,
                    };
                    self.seq += 1;
                    let core = self.nodes[usize::from(leader - 1)]
                        .core
                        .as_mut()
                        .expect("up");
                    core.change_members(session, ReqId(self.seq), change);
                }
            }
        }
    }

    fn crash(&mut self, id: u8) {
        if self.trace {
            eprintln!("t={} crash {id}", self.now);
        }
        let i = usize::from(id - 1);
        self.nodes[i].core = None;
        self.nodes[i].restart_at = self.now + self.rng.gen_range(20..300);
        for c in self.clients.iter_mut().filter(|c| c.node == id) {
            c.session = None;
            c.state = CState::NoSession;
        }
    }

    fn up(&self, id: u8) -> bool {
        self.nodes[usize::from(id - 1)].core.is_some()
    }

    fn send(&mut self, from: u8, to: u8, payload: Payload) {
        if self.chaos && self.rng.gen_bool(self.loss) {
            return;
        }
        let delay = self.rng.gen_range(1..=3);
        self.seq += 1;
        self.inflight
            .insert((self.now + delay, self.seq), Envelope { from, to, payload });
    }

    fn faults(&mut self) {
        let n = self.nodes.len() as u8;
        if self.rng.gen_bool(0.004) {
            let id = self.rng.gen_range(1..=n);
            if self.up(id) {
                self.crash(id);
            }
        }
        for id in 1..=n {
            if !self.up(id) && self.nodes[usize::from(id - 1)].restart_at <= self.now {
                self.start_or_rejoin(id);
            }
        }
        let all_members = self
            .nodes
            .iter()
            .all(|x| x.membership == Membership::Member);
        if all_members && self.rng.gen_bool(0.003) {
            let id = self.rng.gen_range(1..=n);
            if !self.up(id) {
                if self.trace {
                    eprintln!("t={} removing {id}", self.now);
                }
                self.nodes[usize::from(id - 1)].membership = Membership::Removing;
            }
        }
        if self.cut.is_empty() && self.rng.gen_bool(0.004) {
            let victim = self.rng.gen_range(1..=n);
            let mode = self.rng.gen_range(0..3); // both ways, inbound only, outbound only
            for other in (1..=n).filter(|o| *o != victim) {
                if mode != 1 {
                    self.cut.insert((victim, other));
                }
                if mode != 2 {
                    self.cut.insert((other, victim));
                }
            }
            self.heal_at = self.now + self.rng.gen_range(30..400);
            if self.trace {
                eprintln!("t={} cut {:?} until {}", self.now, self.cut, self.heal_at);
            }
        } else if !self.cut.is_empty() && self.now >= self.heal_at {
            self.cut.clear();
        }
    }

    fn deliver(&mut self) {
        while let Some(entry) = self.inflight.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let env = entry.remove();
            if self.cut.contains(&(env.from, env.to)) {
                continue;
            }
            let Some(core) = self.nodes[usize::from(env.to - 1)].core.as_mut() else {
                continue;
            };
            match env.payload {
                Payload::Raft(m) => core.step(m),
                Payload::Probe(p) => core.on_probe(NodeId(env.from), p),
            }
        }
    }

    fn client_act(&mut self, ci: usize) {
        let node = self.clients[ci].node;
        let ni = usize::from(node - 1);
        let Some(core) = self.nodes[ni].core.as_ref() else {
            return;
        };
        let ready = core.is_ready_for_sessions();
        let incarnation = core.incarnation();
        let now = self.now;
        let state = self.clients[ci].state.clone();
        let cmd = match state {
            CState::NoSession
                if ready && now < CHAOS_TICKS + FINAL_TICKS / 2 && self.rng.gen_bool(0.2) =>
            {
                self.nodes[ni].session_seq += 1;
                let session = SessionId {
                    node: NodeId(node),
                    incarnation,
                    seq: self.nodes[ni].session_seq,
                };
                let c = &mut self.clients[ci];
                c.session = Some(session);
                c.state = CState::Opening;
                c.next_req = 0;
                Some(Command::OpenSession {
                    session,
                    client: "sim".into(),
                })
            }
            // Give up on a session still opening, or close an open one: the close may be
            // applied before a retried open or request of the same session.
            CState::Opening | CState::Requesting { .. }
                if self.chaos && self.rng.gen_bool(0.01) =>
            {
                let session = self.clients[ci].session.expect("has a session");
                self.clients[ci].session = None;
                self.clients[ci].state = CState::NoSession;
                Some(Command::CloseSession { session })
            }
            CState::Ready if self.chaos && self.rng.gen_bool(0.003) => {
                let session = self.clients[ci].session.expect("ready has a session");
                self.clients[ci].session = None;
                self.clients[ci].state = CState::NoSession;
                Some(Command::CloseSession { session })
            }
            CState::Ready if self.chaos && self.rng.gen_bool(0.15) => {
                let res = self.rng.gen_range(0..RESOURCES);
                let mode = [
                    Mode::NL,
                    Mode::CR,
                    Mode::PR,
                    Mode::PR,
                    Mode::PW,
                    Mode::EX,
                    Mode::EX,
                ][self.rng.gen_range(0..7)];
                let mut flags = Flags::default();
                if self.rng.gen_bool(0.1) {
                    flags = flags | Flags::NOQUEUE;
                }
                // Journal recovery: may pass orphans of fenced nodes, never live holders.
                if self.rng.gen_bool(0.1) {
                    flags = flags | Flags::RECOVERY;
                }
                let c = &mut self.clients[ci];
                c.next_req += 1;
                let req = ReqId(c.next_req);
                c.state = CState::Requesting { req, res, mode };
                Some(Command::Lock {
                    session: c.session.expect("ready has a session"),
                    req,
                    lockspace: LS.into(),
                    resource: format!("r{res}").into_bytes(),
                    mode,
                    flags,
                })
            }
            CState::Holding {
                lock,
                release_at: Some(at),
                ..
            } if at <= now => {
                let c = &mut self.clients[ci];
                c.next_req += 1;
                let req = ReqId(c.next_req);
                c.state = CState::Releasing { req };
                Some(Command::Unlock {
                    session: c.session.expect("holding has a session"),
                    req,
                    lock,
                    lvb: None,
                })
            }
            _ => None,
        };
        if let Some(cmd) = cmd {
            if self.trace {
                eprintln!("t={now} client {ci} submits {cmd:?}");
            }
            self.nodes[ni].core.as_mut().expect("up").submit(cmd);
        }
    }

    /// Plays operator and filesystem: fence-acks nodes that are really down (crashed) and
    /// reports recovery-done for fenced nodes that still have orphans.
    fn admin(&mut self, node: u8) {
        let ni = usize::from(node - 1);
        if self.now - self.nodes[ni].last_admin < 25 {
            return;
        }
        let Some(ci) = self.clients.iter().position(|c| {
            c.node == node && matches!(c.state, CState::Ready | CState::Holding { .. })
        }) else {
            return;
        };
        self.nodes[ni].last_admin = self.now;
        let records = self.nodes[ni]
            .core
            .as_ref()
            .expect("up")
            .table()
            .nodes()
            .clone();
        let mut cmds = Vec::new();
        for (n, rec) in records {
            let orphans = self.nodes[ni]
                .core
                .as_ref()
                .expect("up")
                .table()
                .orphan_count(n);
            let session = self.clients[ci].session.expect("has a session");
            self.clients[ci].next_req += 1;
            let req = ReqId(self.clients[ci].next_req);
            if !rec.up && !rec.fenced && !self.up(n.0) {
                cmds.push(Command::FenceAck {
                    session,
                    req,
                    node: n,
                });
            } else if rec.fenced && orphans > 0 {
                cmds.push(Command::RecoveryDone {
                    session,
                    req,
                    node: n,
                    lockspace: LS.into(),
                });
            }
        }
        let core = self.nodes[ni].core.as_mut().expect("up");
        for cmd in cmds {
            core.submit(cmd);
        }
    }

    fn client_of(&self, session: SessionId) -> Option<usize> {
        self.clients.iter().position(|c| c.session == Some(session))
    }

    fn on_effect(&mut self, fx: Effect) {
        if self.trace {
            eprintln!("t={} fx {fx:?}", self.now);
        }
        let Some(ci) = self.client_of(fx.session()) else {
            return; // a closed session's late effects
        };
        let state = self.clients[ci].state.clone();
        match fx {
            Effect::SessionOpened { .. } => {
                if state == CState::Opening {
                    self.clients[ci].state = CState::Ready;
                }
            }
            Effect::SessionEnded { .. } => {
                self.clients[ci].session = None;
                self.clients[ci].state = CState::NoSession;
            }
            Effect::Granted {
                req, lock, mode, ..
            } => match state {
                CState::Requesting {
                    req: want,
                    res,
                    mode: m,
                } if want == req && m == mode => {
                    let release_at = if self.rng.gen_bool(0.3) {
                        Some(self.now + self.rng.gen_range(1..60))
                    } else {
                        None // cache the lock until someone calls it back (GFS2 style)
                    };
                    self.clients[ci].state = CState::Holding {
                        lock,
                        res,
                        mode,
                        release_at,
                    };
                    self.grants += 1;
                    self.check_compatible(res);
                }
                other => self.fail(format!("grant {req:?} {lock} {mode} in state {other:?}")),
            },
            Effect::Failed { req, error, .. } => match (&state, &error) {
                (CState::Opening, LockError::Refused(_)) => {
                    self.clients[ci].session = None;
                    self.clients[ci].state = CState::NoSession;
                }
                (CState::Requesting { req: want, .. }, LockError::WouldBlock) if *want == req => {
                    self.clients[ci].state = CState::Ready
                }
                (_, LockError::NodeNotDown(_) | LockError::NodeNotFenced(_)) => {}
                (_, LockError::NoSession) => {
                    self.clients[ci].session = None;
                    self.clients[ci].state = CState::NoSession;
                }
                _ => self.fail(format!(
                    "unexpected failure {error:?} for {req:?} in {state:?}"
                )),
            },
            Effect::Blocking { lock, .. } => {
                self.basts += 1;
                if let CState::Holding {
                    lock: held,
                    res,
                    mode,
                    release_at,
                } = state
                {
                    if held == lock {
                        let soon = self.now + self.rng.gen_range(0..5);
                        self.clients[ci].state = CState::Holding {
                            lock,
                            res,
                            mode,
                            release_at: Some(release_at.map_or(soon, |r| r.min(soon))),
                        };
                    }
                }
            }
            Effect::Unlocked { req, .. } => {
                if state == (CState::Releasing { req }) {
                    self.clients[ci].state = CState::Ready;
                }
            }
            Effect::Done { .. } => {}
        }
    }

    fn check_compatible(&self, res: usize) {
        let holders: Vec<(usize, Mode)> = self
            .clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c.state {
                CState::Holding { res: r, mode, .. } if r == res => Some((i, mode)),
                _ => None,
            })
            .collect();
        for (i, (a, ma)) in holders.iter().enumerate() {
            for (b, mb) in &holders[i + 1..] {
                if !ma.compatible(*mb) {
                    self.fail(format!(
                        "clients {a} ({ma}) and {b} ({mb}) hold resource r{res} at once"
                    ));
                }
            }
        }
    }

    fn step_node(&mut self, id: u8) {
        let ni = usize::from(id - 1);
        if self.nodes[ni].core.is_none() {
            return;
        }
        let before = self.nodes[ni].core.as_ref().expect("up").incarnation();
        self.nodes[ni].core.as_mut().expect("up").tick();
        let cis: Vec<usize> = (0..self.clients.len())
            .filter(|i| self.clients[*i].node == id)
            .collect();
        for ci in cis {
            self.client_act(ci);
        }
        self.admin(id);
        let core = self.nodes[ni].core.as_mut().expect("up");
        let out = match core.process() {
            Ok(out) => out,
            Err(e) => self.fail(format!("node {id} failed: {e}")),
        };
        let after = self.nodes[ni].core.as_ref().expect("up").incarnation();
        for m in out.messages {
            let to = m.to as u8;
            self.send(id, to, Payload::Raft(m));
        }
        for (to, p) in out.probes {
            self.send(id, to.0, Payload::Probe(p));
        }
        for fx in out.effects {
            self.on_effect(fx);
        }
        if before != after {
            // Self-fenced or resynced from a snapshot: sessions still opening are void too.
            for c in self.clients.iter_mut().filter(|c| c.node == id) {
                if c.session.is_some_and(|s| s.incarnation != after) {
                    c.session = None;
                    c.state = CState::NoSession;
                }
            }
        }
    }

    fn run(&mut self) {
        let n = self.nodes.len() as u8;
        while self.now < CHAOS_TICKS + FINAL_TICKS {
            self.now += 1;
            if self.now == CHAOS_TICKS {
                self.chaos = false;
                self.cut.clear();
                for id in 1..=n {
                    if !self.up(id) {
                        self.start_or_rejoin(id);
                    }
                }
            }
            if self.chaos {
                self.faults();
            } else {
                for id in 1..=n {
                    if !self.up(id) {
                        self.start_or_rejoin(id);
                    }
                }
            }
            self.drive_membership();
            self.deliver();
            for id in 1..=n {
                self.step_node(id);
            }
        }
        self.final_checks();
    }

    fn final_checks(&mut self) {
        if self.trace {
            for node in &self.nodes {
                let Some(core) = node.core.as_ref() else {
                    eprintln!("node down ({:?})", node.membership);
                    continue;
                };
                let log = core.log();
                eprintln!(
                    "  log conf {:?} snap idx {} snap conf {:?} hs {:?}",
                    log.conf_state().voters,
                    log.latest_snapshot().get_metadata().index,
                    log.latest_snapshot().get_metadata().get_conf_state().voters,
                    log.hard_state()
                );
                eprintln!(
                    "node {} inc {} ready {} status {:?}",
                    core.id(),
                    core.incarnation(),
                    core.is_ready_for_sessions(),
                    core.status()
                );
                for r in core.table().resources_in(LS) {
                    eprintln!("  {r:?}");
                }
            }
            for (i, c) in self.clients.iter().enumerate() {
                eprintln!("client {i} {:?} {:?}", c.session, c.state);
            }
        }
        for (i, c) in self.clients.iter().enumerate() {
            if !matches!(
                c.state,
                CState::NoSession | CState::Ready | CState::Holding { .. }
            ) {
                self.fail(format!(
                    "no progress with every node up: client {i} still in {:?}",
                    c.state
                ));
            }
        }
        let leader = (1..=self.nodes.len() as u8)
            .find(|id| {
                self.nodes[usize::from(id - 1)]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.is_leader())
            })
            .unwrap_or_else(|| self.fail("no leader after healing".into()));
        let core = self.nodes[usize::from(leader - 1)]
            .core
            .as_ref()
            .expect("up");
        let table = core.table();
        for (i, c) in self.clients.iter().enumerate() {
            if let CState::Holding { lock, mode, .. } = c.state {
                let l = table.lock(lock);
                if l.map(|l| (l.granted, l.orphaned, Some(l.owner)))
                    != Some((Some(mode), false, c.session))
                {
                    self.fail(format!(
                        "client {i} holds {lock} {mode} but the table says {l:?}"
                    ));
                }
            }
        }
        for r in table.resources_in(LS) {
            for l in r.granted.iter().chain(&r.converting).chain(&r.waiting) {
                if l.orphaned {
                    self.fail(format!("orphan {} left after recovery", l.lock));
                }
                let Some(ci) = self.client_of(l.owner) else {
                    self.fail(format!("lock {} of a session no client has", l.lock));
                };
                let held = matches!(self.clients[ci].state, CState::Holding { lock, .. } if lock == l.lock);
                if !held {
                    self.fail(format!(
                        "lost grant: table has lock {} for client {ci} in {:?}",
                        l.lock, self.clients[ci].state
                    ));
                }
            }
        }
        let status = core.status();
        for node in &self.nodes {
            let other = node.core.as_ref().expect("all up");
            let s = other.status();
            if s.applied_index == status.applied_index && s.last_token != status.last_token {
                self.fail(format!("replicas diverge at index {}", s.applied_index));
            }
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("TANDEM_SIM_SEED") {
        return vec![seed.parse().expect("TANDEM_SIM_SEED is a number")];
    }
    // `TANDEM_SIM_SEEDS=N` runs seeds 0..N; `TANDEM_SIM_SEEDS=A..B` runs A..B.
    let spec = std::env::var("TANDEM_SIM_SEEDS").unwrap_or_default();
    if let Some((a, b)) = spec.split_once("..") {
        let a: u64 = a.parse().expect("TANDEM_SIM_SEEDS=A..B");
        let b: u64 = b.parse().expect("TANDEM_SIM_SEEDS=A..B");
        return (a..b).collect();
    }
    (0..spec.parse().unwrap_or(0)).collect()
}

fn run_seeds(n: u8, default_count: u64) {
    let mut list = seeds();
    if list.is_empty() {
        list = (0..default_count).collect();
    }
    let (mut grants, mut basts) = (0, 0);
    for seed in list {
        let mut sim = Sim::new(seed, n);
        sim.run();
        grants += sim.grants;
        basts += sim.basts;
    }
    // The checker must have had something to check.
    assert!(
        grants > 0 && basts > 0,
        "no grants ({grants}) or callbacks ({basts})"
    );
}

#[test]
fn simulate_three_nodes() {
    run_seeds(3, 700);
}

#[test]
fn simulate_five_nodes() {
    run_seeds(5, 350);
}
