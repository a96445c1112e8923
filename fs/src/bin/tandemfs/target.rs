//! Opening a TARGET argument: an image file, a block device, or an NBD export URI.

use std::path::Path;
use std::sync::Arc;

use tandem_fs::block::{BlockDevice, FileDevice};

/// Opens `target` for the tools. `nbd+unix:///EXPORT?socket=PATH` names an NBD export
/// (normally a tandem-replicatord resource).
pub fn open_target(target: &str, writable: bool) -> anyhow::Result<Arc<dyn BlockDevice>> {
    if target.starts_with("nbd") {
        return open_nbd(target);
    }
    let dev = FileDevice::open_exclusive(Path::new(target), writable)
        .map_err(|e| anyhow::anyhow!("cannot open {target}: {e}"))?;
    Ok(Arc::new(dev))
}

#[cfg(feature = "nbd")]
fn open_nbd(target: &str) -> anyhow::Result<Arc<dyn BlockDevice>> {
    let (socket, export) = tandem_fs::nbd::parse_uri(target)
        .ok_or_else(|| anyhow::anyhow!("{target}: expected nbd+unix:///EXPORT?socket=PATH"))?;
    let dev = tandem_fs::nbd::NbdDevice::connect(Path::new(&socket), &export)
        .map_err(|e| anyhow::anyhow!("cannot connect to NBD export {export:?} at {socket}: {e}"))?;
    Ok(Arc::new(dev))
}

#[cfg(not(feature = "nbd"))]
fn open_nbd(target: &str) -> anyhow::Result<Arc<dyn BlockDevice>> {
    anyhow::bail!("{target}: this build has no NBD support (feature \"nbd\")")
}
