//! Identities, lock modes, flags and value blocks shared by the lock table, the wire protocol
//! and the client library.

use serde::{Deserialize, Serialize};
use std::fmt;
use tandem_common::NodeId;

/// Longest lockspace name, as in the Linux DLM (`DLM_LOCKSPACE_LEN`).
pub const MAX_LOCKSPACE_NAME_BYTES: usize = 64;
/// Longest resource name, as in the Linux DLM (`DLM_RESNAME_MAXLEN`).
pub const MAX_RESOURCE_NAME_BYTES: usize = 64;
/// Size of a lock value block (classic fs/dlm `DLM_LVB_LEN`).
pub const LVB_BYTES: usize = 32;

/// A lock value block: 32 bytes stored with the resource.
pub type Lvb = [u8; LVB_BYTES];

/// A client session: one connection to one `tandem-lockd` incarnation. Owning node and
/// daemon incarnation are part of the id so that node death and daemon restarts can find
/// every session they end without any extra index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId {
    pub node: NodeId,
    pub incarnation: u64,
    pub seq: u64,
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:x}/{}", self.node, self.incarnation, self.seq)
    }
}

/// A lock, assigned by the table when a request is first applied. Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LockId(pub u64);

impl fmt::Display for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A request id chosen by the client, unique within its session; used to match replies and
/// to drop duplicate proposals after a leader change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReqId(pub u64);

/// Monotonic across the whole cluster: every grant or conversion gets a larger token than any
/// earlier one, so storage can reject I/O from a holder that lost its lock (Kleppmann).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The six VMS/DLM lock modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Null: holds a place (and the LVB) without blocking anyone.
    NL,
    /// Concurrent read.
    CR,
    /// Concurrent write.
    CW,
    /// Protected read (shared).
    PR,
    /// Protected write (update).
    PW,
    /// Exclusive.
    EX,
}

impl Mode {
    pub const ALL: [Mode; 6] = [Mode::NL, Mode::CR, Mode::CW, Mode::PR, Mode::PW, Mode::EX];

    /// The standard DLM compatibility matrix (VAXcluster principles, fs/dlm `__dlm_compat_matrix`).
    pub fn compatible(self, other: Mode) -> bool {
        use Mode::*;
        match (self, other) {
            (NL, _) | (_, NL) => true,
            (CR, EX) | (EX, CR) => false,
            (CR, _) | (_, CR) => true,
            (CW, CW) => true,
            (PR, PR) => true,
            _ => false,
        }
    }

    /// Whether a lock in this mode may write the value block when it is lowered or released.
    pub fn writes_lvb(self) -> bool {
        matches!(self, Mode::PW | Mode::EX)
    }

    pub fn parse(text: &str) -> Option<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.to_string().eq_ignore_ascii_case(text))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Mode::NL => "NL",
            Mode::CR => "CR",
            Mode::CW => "CW",
            Mode::PR => "PR",
            Mode::PW => "PW",
            Mode::EX => "EX",
        };
        f.write_str(s)
    }
}

/// Request flags (a subset of `dlmconstants.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Flags(pub u32);

impl Flags {
    /// Fail with `WouldBlock` instead of queueing.
    pub const NOQUEUE: Flags = Flags(1);
    /// The request converts an existing lock (implied by `Command::Convert`; accepted for
    /// compatibility with DLM callers).
    pub const CONVERT: Flags = Flags(2);
    /// Queue a conversion behind the existing convert queue instead of granting it in place,
    /// preventing indefinite postponement of earlier conversions.
    pub const QUECVT: Flags = Flags(4);
    /// May be granted on resources that hold orphaned locks of a fenced node (journal replay).
    pub const RECOVERY: Flags = Flags(8);
    /// If the owning session closes while the lock is granted, keep it as an orphan
    /// (DLM's `PERSISTENT`) instead of releasing it: a filesystem mount that dies holding
    /// its journal and metadata locks must block others until a survivor replays its
    /// journal. Such orphans need no fencing (the process is gone) and are passed by
    /// `RECOVERY` requests at once.
    pub const PERSISTENT: Flags = Flags(16);
    /// With `NOQUEUE`: before failing, send blocking callbacks to the holders in the way
    /// (DLM's `NOQUEUEBAST`). A filesystem deleting an inode asks nodes that merely cache
    /// its iopen lock to drop it, without waiting for them.
    pub const NOQUEUEBAST: Flags = Flags(32);
    const KNOWN: u32 = 1 | 2 | 4 | 8 | 16 | 32;

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn is_valid(self) -> bool {
        self.0 & !Self::KNOWN == 0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// Checks a lockspace name: `cluster:fsname` style, printable ASCII, bounded.
pub fn validate_lockspace(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_LOCKSPACE_NAME_BYTES {
        return Err(format!(
            "lockspace name must be 1..={MAX_LOCKSPACE_NAME_BYTES} bytes"
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("lockspace name must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// Checks a resource name: any bytes, bounded.
pub fn validate_resource(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_RESOURCE_NAME_BYTES {
        return Err(format!(
            "resource name must be 1..={MAX_RESOURCE_NAME_BYTES} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_matrix_matches_the_dlm() {
        // Rows/columns NL CR CW PR PW EX, from fs/dlm's __dlm_compat_matrix.
        let expected = [
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0],
        ];
        for (i, a) in Mode::ALL.iter().enumerate() {
            for (j, b) in Mode::ALL.iter().enumerate() {
                assert_eq!(a.compatible(*b), expected[i][j] == 1, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn mode_parse_round_trips() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(&m.to_string().to_lowercase()), Some(m));
        }
        assert_eq!(Mode::parse("XX"), None);
    }

    #[test]
    fn names_are_bounded() {
        assert!(validate_lockspace("c:www").is_ok());
        assert!(validate_lockspace("").is_err());
        assert!(validate_lockspace("a b").is_err());
        assert!(validate_lockspace(&"x".repeat(65)).is_err());
        assert!(validate_resource(&[0u8; 64]).is_ok());
        assert!(validate_resource(&[0u8; 65]).is_err());
        assert!(!Flags(64).is_valid());
        assert!((Flags::NOQUEUE | Flags::RECOVERY).contains(Flags::RECOVERY));
    }
}
