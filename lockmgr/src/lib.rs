//! tandem-lockmgr: filled in by its own issue.
