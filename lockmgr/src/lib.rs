//! Tandem's lock manager: a DLM whose lock table is replicated with Raft.
//!
//! - `types`: ids, modes, flags, value blocks.
//! - `table`: the pure lock-table state machine (Raft log entries in, effects out).

pub mod table;
pub mod types;
