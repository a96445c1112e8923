//! tandem-replicator: synchronous block replication (the DRBD role).
//!
//! Layout: `backing` (local disk I/O), `meta` (on-disk metadata), `state` (DRBD's words),
//! `proto` (peer wire messages), `engine` (one replicated resource: roles, write path,
//! sync), `peer` (TCP links), `nbd` (NBD server and client), `control` (the tandemadm
//! socket), `daemon` (wiring it together).

pub mod backing;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod meta;
pub mod nbd;
pub mod peer;
pub mod proto;
pub mod state;
