//! Newtypes for identities shared across crates.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's numeric id, unique within the cluster (DRBD's `node-id`). 1..=255.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct NodeId(pub u8);

impl NodeId {
    pub const MIN: u8 = 1;
    /// DRBD supports 32 nodes per resource; we allow ids up to 255 but at most 16 nodes.
    pub const MAX: u8 = 255;

    pub fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
