//! Tandem's lock manager: a DLM whose lock table is replicated with Raft.
//!
//! - `types`: ids, modes, flags, value blocks.
//! - `table`: the pure lock-table state machine (Raft log entries in, effects out).
//! - `log_cache`: the in-memory Raft log that raft-rs reads, rebuilt from durable records.
//! - `node`: one replica, sans-IO (raft-rs Ready loop, batching, retries, failure detection).
//! - `wal`: the durable, checksummed Raft log; `proto`: the client wire protocol.
//! - `daemon`: `tandem-lockd` (replica task, peer transport, client socket, one thread).
//! - `client`: the async client library.

pub mod bench;
pub mod client;
pub mod daemon;
pub mod fuzzing;
pub mod log_cache;
pub mod mem_sink;
pub mod node;
pub mod proto;
pub mod table;
pub mod types;
pub mod wal;
