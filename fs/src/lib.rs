//! tandem-fs: the on-disk format, mkfs/fsck, and the journaling filesystem core that
//! `mount.tandem` serves over FUSE.
//!
//! Layering (mountpoint-s3 style): `fuse` is a thin adapter over `fs::Fs`, whose
//! operations are synchronous and callable from tests without a kernel. Below it, `store`
//! owns the metadata cache, the running transaction and the allocator; `journal` makes
//! transactions atomic; `block` is the only place that touches a device.

pub mod acl;
pub mod block;
pub mod cluster;
pub mod data;
pub mod dir;
pub mod error;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod inode;
pub mod journal;
pub mod mkfs;
#[cfg(feature = "nbd")]
pub mod nbd;
pub mod store;
pub mod xattr;

pub use block::{BlockDevice, CrashMode, FaultDevice, FileDevice};
pub use error::{FsError, Result};
pub use fs::{Fs, FsOptions};
