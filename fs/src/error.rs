//! Filesystem errors and their single, exhaustive errno mapping.

use std::io;

use thiserror::Error;

use crate::format::FormatError;

/// Every way a filesystem operation can fail. Each variant is a distinct caller reaction.
#[derive(Debug, Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name longer than 255 bytes")]
    NameTooLong,
    #[error("no space left on the filesystem")]
    NoSpace,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("operation not permitted")]
    NotPermitted,
    #[error("permission denied")]
    Access,
    #[error("no such extended attribute")]
    NoXattr,
    #[error("extended attribute value or list too large for the caller's buffer")]
    Range,
    #[error("extended attributes of this inode do not fit in one block")]
    XattrTooBig,
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    #[error("file too large")]
    FileTooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("stale file handle (inode {0} is gone)")]
    Stale(u64),
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("journal {0} needs replay: mount read-write once or run fsck.tandem -y")]
    NeedsRecovery(u32),
    #[error("corrupt metadata: {0}")]
    Corrupt(FormatError),
    #[error("metadata inconsistency in block {block}: {what}")]
    Inconsistent { block: u64, what: String },
    #[error("device I/O failed: {0}")]
    Io(io::Error),
    #[error("an earlier journal write failed; the filesystem must be remounted")]
    Poisoned,
    /// The cluster lock session is gone: this node may no longer touch the filesystem.
    #[error("withdrawn from the cluster ({0}); unmount and mount again")]
    Withdrawn(String),
    #[error("lock manager: {0}")]
    Lock(String),
    #[error("{0}")]
    Mount(String),
}

pub type Result<T> = std::result::Result<T, FsError>;

impl FsError {
    /// The one place an error becomes an errno. Adding a variant fails to compile here.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotPermitted => libc::EPERM,
            FsError::Access => libc::EACCES,
            FsError::NoXattr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::XattrTooBig => libc::ENOSPC,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::FileTooBig => libc::EFBIG,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::Stale(_) => libc::ESTALE,
            FsError::ReadOnly => libc::EROFS,
            FsError::NeedsRecovery(_) => libc::EROFS,
            FsError::Corrupt(_) => libc::EIO,
            FsError::Inconsistent { .. } => libc::EIO,
            FsError::Io(_) => libc::EIO,
            FsError::Poisoned | FsError::Withdrawn(_) | FsError::Lock(_) | FsError::Mount(_) => {
                libc::EIO
            }
        }
    }

    pub fn inconsistent(block: u64, what: impl Into<String>) -> Self {
        FsError::Inconsistent {
            block,
            what: what.into(),
        }
    }
}

// Manual conversions instead of #[from]: the message already includes the inner error,
// and a `source` would make `{:#}` chains print it twice.
impl From<FormatError> for FsError {
    fn from(e: FormatError) -> Self {
        FsError::Corrupt(e)
    }
}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> Self {
        FsError::Io(e)
    }
}
