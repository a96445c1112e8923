//! tandem-fs: filled in by its own issue.
