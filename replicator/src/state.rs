//! DRBD's state vocabulary, 1:1, as shown by `tandemadm status`, `status --json` and `events`.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! words {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name { $($variant),+ }
        impl $name {
            pub fn word(self) -> &'static str {
                match self { $(Self::$variant => $word),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.word()) }
        }
    };
}

words!(
    /// A node's role for one resource.
    Role { Primary = "Primary", Secondary = "Secondary", Unknown = "Unknown" }
);

words!(
    /// Disk states; only UpToDate data may serve application I/O on a Primary.
    DiskState {
        Diskless = "Diskless",
        Attaching = "Attaching",
        Failed = "Failed",
        Inconsistent = "Inconsistent",
        Outdated = "Outdated",
        DUnknown = "DUnknown",
        Consistent = "Consistent",
        UpToDate = "UpToDate",
    }
);

words!(
    /// Per-peer connection state.
    ConnState {
        StandAlone = "StandAlone",
        Disconnecting = "Disconnecting",
        Unconnected = "Unconnected",
        NetworkFailure = "NetworkFailure",
        ProtocolError = "ProtocolError",
        Connecting = "Connecting",
        Connected = "Connected",
    }
);

words!(
    /// Per-peer replication state.
    ReplState {
        Off = "Off",
        Established = "Established",
        SyncSource = "SyncSource",
        SyncTarget = "SyncTarget",
        WFBitMapT = "WFBitMapT",
        PausedSyncS = "PausedSyncS",
        PausedSyncT = "PausedSyncT",
        VerifyS = "VerifyS",
        VerifyT = "VerifyT",
    }
);

impl DiskState {
    /// On-disk code in the metadata superblock (see docs/FORMAT.md).
    pub fn to_code(self) -> u8 {
        match self {
            DiskState::Inconsistent => 1,
            DiskState::Outdated => 2,
            DiskState::Consistent => 3,
            DiskState::UpToDate => 4,
            // Transient states are stored as Inconsistent: safe on restart.
            _ => 1,
        }
    }
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => DiskState::Inconsistent,
            2 => DiskState::Outdated,
            3 => DiskState::Consistent,
            4 => DiskState::UpToDate,
            _ => return None,
        })
    }
}
