//! `on-io-error`: what a local disk error does. With `detach` (the default, as in DRBD) the
//! node drops its disk and keeps serving: writes go to the peers only, reads are fetched
//! from an UpToDate peer. With `pass-on` the error goes to the application and the disk
//! state becomes Failed. Either way the peers learn our new disk state and track what we
//! miss; a replaced disk comes back through `create-md` and a full resync.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::io::IoError;
use super::{Conn, Resource};
use crate::backing::BackingError;
use crate::proto::PeerMsg;
use crate::state::DiskState;

const REMOTE_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Conn {
    pub fn expect_read(&self, seq: u64) -> oneshot::Receiver<Result<Vec<u8>, String>> {
        let (tx, rx) = oneshot::channel();
        if !self.is_closed() {
            self.read_pending.lock().insert(seq, tx);
        }
        rx
    }

    pub fn complete_read(&self, seq: u64, r: Result<Vec<u8>, String>) {
        if let Some(tx) = self.read_pending.lock().remove(&seq) {
            let _ = tx.send(r);
        }
    }
}

impl Resource {
    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    /// A local disk request failed. Returns true if I/O may continue through peers.
    pub(super) async fn on_disk_error(&self, e: &BackingError) -> bool {
        use tandem_common::config::OnIoError;
        match self.settings.on_io_error {
            OnIoError::Detach => {
                if !self.detached.swap(true, Ordering::AcqRel) {
                    tracing::error!(resource = %self.name(), error = %e,
                        "local disk failed: detaching it (on-io-error = detach); I/O continues Diskless through the peers. Replace the disk, then `tandemadm create-md --force` and `tandemadm up` to resync it");
                    self.set_disk(DiskState::Diskless);
                    self.broadcast_state().await;
                }
                true
            }
            OnIoError::PassOn => {
                if self.disk() != DiskState::Failed {
                    tracing::error!(resource = %self.name(), error = %e,
                        "local disk failed: reporting the error to the application (on-io-error = pass-on)");
                    self.set_disk(DiskState::Failed);
                    self.broadcast_state().await;
                }
                false
            }
        }
    }

    /// Reads from a connected UpToDate peer (Diskless operation).
    pub(super) async fn remote_read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        let source: Option<Arc<Conn>> = {
            let inner = self.inner.lock();
            inner
                .peers
                .values()
                .filter(|p| {
                    p.state
                        .as_ref()
                        .is_some_and(|s| s.disk == DiskState::UpToDate)
                })
                .find_map(|p| p.conn.clone())
        };
        let conn = source.ok_or(IoError::NotUpToDate(DiskState::Diskless))?;
        self.remote_read_from(&conn, offset, len).await
    }

    /// Reads `[offset, offset+len)` from `conn`'s peer (answered in its stream order, so
    /// after every write we sent it before).
    pub(super) async fn remote_read_from(
        &self,
        conn: &Conn,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, IoError> {
        let seq = self.next_seq();
        let rx = conn.expect_read(seq);
        if !conn.send(&PeerMsg::ReadRequest { seq, offset, len }).await {
            return Err(IoError::NotUpToDate(DiskState::Diskless));
        }
        match tokio::time::timeout(REMOTE_READ_TIMEOUT, rx).await {
            Ok(Ok(Ok(data))) if data.len() == len as usize => Ok(data),
            _ => Err(IoError::NotUpToDate(DiskState::Diskless)),
        }
    }

    /// Peer side of a diskless read.
    pub(super) async fn answer_read(&self, conn: &Conn, seq: u64, offset: u64, len: u32) {
        let reply = if self.disk() != DiskState::UpToDate || self.is_detached() {
            Err(format!("this node's disk is {}", self.disk()))
        } else {
            self.backing
                .read_at(offset, len as usize)
                .await
                .map_err(|e| e.to_string())
        };
        let (data, error) = match reply {
            Ok(d) => (d, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        conn.send(&PeerMsg::ReadReply { seq, data, error }).await;
    }
}
