//! Entry points for fuzzing the lock manager's parsers and state machine. `fuzz/` targets
//! (cargo-fuzz, nightly) call these; the stable test suite runs them over seeded random
//! inputs. None of them may panic on any input.

use crate::proto::{ClientRequest, MAX_REQUEST_FRAME_BYTES};
use crate::table::{Command, LockTable};
use tandem_common::frame::{self, Channel};

/// Bytes as they arrive on the client socket.
pub fn client_frames(data: &[u8]) {
    let mut at = 0;
    while at < data.len() {
        match frame::decode_from_buf::<ClientRequest>(
            &data[at..],
            Channel::LockClient,
            MAX_REQUEST_FRAME_BYTES,
        ) {
            Ok(Some((_, used))) => at += used,
            Ok(None) | Err(_) => break,
        }
    }
}

/// Bytes of a write-ahead log file.
pub fn wal_bytes(data: &[u8]) {
    let mut log = crate::log_cache::LogCache::default();
    let mut at = 0;
    while let Some((rec, used)) = crate::wal::decode_record(&data[at..]) {
        if log.apply(&rec).is_err() {
            break;
        }
        at += used;
    }
}

/// A sequence of bincode-encoded commands applied to an empty table; the table's
/// invariants must hold after each one.
pub fn table_commands(data: &[u8]) {
    let mut table = LockTable::new();
    let cfg = bincode::config::standard().with_limit::<{ 1 << 20 }>();
    let mut at = 0;
    while at < data.len() {
        let Ok((cmd, used)) = bincode::serde::decode_from_slice::<Command, _>(&data[at..], cfg)
        else {
            break;
        };
        at += used.max(1);
        let _ = table.apply(&cmd);
        if let Err(e) = table.check_invariants() {
            panic!("invariant broken after {cmd:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Flags, LockId, Mode, ReqId, SessionId};
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use tandem_common::NodeId;

    fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..rng.gen_range(0..8) {
            match rng.gen_range(0..3) {
                0 if !v.is_empty() => {
                    let i = rng.gen_range(0..v.len());
                    v[i] = rng.gen();
                }
                1 => {
                    let i = rng.gen_range(0..=v.len());
                    v.insert(i, rng.gen());
                }
                _ if !v.is_empty() => {
                    let i = rng.gen_range(0..v.len());
                    v.remove(i);
                }
                _ => {}
            }
        }
        v
    }

    #[test]
    fn fuzz_entry_points_survive_mutated_seeds() {
        let s = SessionId {
            node: NodeId(1),
            incarnation: 1,
            seq: 1,
        };
        let cfg = bincode::config::standard();
        let mut table_seed = Vec::new();
        for cmd in [
            Command::NodeRestart {
                node: NodeId(1),
                incarnation: 1,
            },
            Command::OpenSession {
                session: s,
                client: "f".into(),
            },
            Command::Lock {
                session: s,
                req: ReqId(1),
                lockspace: "c:f".into(),
                resource: b"r".to_vec(),
                mode: Mode::EX,
                flags: Flags::default(),
            },
            Command::Convert {
                session: s,
                req: ReqId(2),
                lock: LockId(1),
                mode: Mode::PR,
                flags: Flags::QUECVT,
                lvb: Some([1; 32]),
            },
            Command::NodeDown {
                node: NodeId(1),
                fenced: true,
            },
        ] {
            table_seed.extend(bincode::serde::encode_to_vec(&cmd, cfg).unwrap());
        }
        let frame_seed = frame::encode(
            Channel::LockClient,
            &ClientRequest::Locks {
                req: ReqId(1),
                lockspace: "c:f".into(),
            },
        )
        .unwrap();
        let wal_seed =
            crate::wal::encode_record(&crate::log_cache::LogRecord::HardState(Default::default()));
        let mut rng = StdRng::seed_from_u64(0x7a6d);
        table_commands(&table_seed);
        for _ in 0..3000 {
            table_commands(&mutate(&mut rng, &table_seed));
            client_frames(&mutate(&mut rng, &frame_seed));
            wal_bytes(&mutate(&mut rng, &wal_seed));
        }
    }
}
