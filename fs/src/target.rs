//! Opening a TARGET argument: an image file, a block device, or (later) an NBD export.

use std::path::Path;
use std::sync::Arc;

use crate::block::{BlockDevice, FileDevice};

/// Opens `target` for the tools. `nbd+unix://` URIs name a replicator export.
pub fn open_target(target: &str, writable: bool) -> anyhow::Result<Arc<dyn BlockDevice>> {
    if target.starts_with("nbd") {
        anyhow::bail!(
            "{target}: NBD targets are served by tandem-replicatord; this build of tandem-fs has no NBD client wired in yet"
        );
    }
    let dev = FileDevice::open(Path::new(target), writable)
        .map_err(|e| anyhow::anyhow!("cannot open {target}: {e}"))?;
    Ok(Arc::new(dev))
}
