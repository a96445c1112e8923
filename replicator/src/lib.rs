//! replicator
