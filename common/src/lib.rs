//! Small pieces every Tandem crate shares: node ids, the cluster configuration file, the
//! versioned+checksummed frame format used on every socket, and the challenge-response
//! authentication that guards every peer port.
//!
//! Kept deliberately small: anything that belongs to one daemon lives in that daemon's crate.

pub mod auth;
pub mod config;
pub mod frame;
pub mod ids;
pub mod logging;
pub mod size;

pub use config::{ClusterConfig, ConfigError};
pub use ids::NodeId;
