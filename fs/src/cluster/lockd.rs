//! The connection to the local `tandem-lockd`: blocking wrappers for the FUSE threads,
//! the callback thread that feeds blocking callbacks to the glocks, and the journal locks.

use std::path::Path;
use std::sync::Arc;

use tandem_common::NodeId;
use tandem_lockmgr::client::{Callback, Client, ClientError, Grant};
use tandem_lockmgr::table::{LockError, ResourceView};
use tandem_lockmgr::types::{Flags, LockId, Mode};
use tokio::sync::mpsc::UnboundedReceiver;

use super::glock::{BackendError, LockBackend};

/// One lock-manager session for one mount. Every lock of the mount belongs to it, so the
/// session closing (the mount process dying) orphans the `PERSISTENT` ones.
pub struct LockdConn {
    rt: tokio::runtime::Runtime,
    client: Client,
    pub lockspace: String,
}

impl LockdConn {
    pub fn connect(
        socket: &Path,
        lockspace: &str,
        client_name: &str,
    ) -> Result<(Arc<Self>, UnboundedReceiver<Callback>), ClientError> {
        // One worker: it only moves frames; the callers block on their own threads.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lockd-client")
            .enable_all()
            .build()
            .map_err(|e| ClientError::Connect {
                path: socket.display().to_string(),
                source: e,
            })?;
        let mut client = rt.block_on(Client::connect(socket, client_name))?;
        let callbacks = client.take_callbacks().expect("first call");
        let conn = Arc::new(Self {
            rt,
            client,
            lockspace: lockspace.to_string(),
        });
        Ok((conn, callbacks))
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Runs `f` on the connection's runtime without waiting for it.
    pub fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        drop(self.rt.spawn(f));
    }

    /// `lock` for callers already on the runtime (`spawn`).
    pub async fn lock_async(
        &self,
        resource: &[u8],
        mode: Mode,
        flags: Flags,
    ) -> Result<Grant, ClientError> {
        self.client
            .lock(&self.lockspace, resource, mode, flags)
            .await
    }

    /// `unlock` for callers already on the runtime (`spawn`).
    pub async fn unlock_async(&self, lock: LockId) -> Result<(), ClientError> {
        self.client.unlock(lock, None).await
    }

    pub fn lock(&self, resource: &[u8], mode: Mode, flags: Flags) -> Result<Grant, ClientError> {
        self.rt
            .block_on(self.client.lock(&self.lockspace, resource, mode, flags))
    }

    /// `lock`, given up (`LockError::Cancelled`) when `give_up` completes first.
    pub fn lock_until(
        &self,
        resource: &[u8],
        mode: Mode,
        flags: Flags,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<Grant, ClientError> {
        self.rt.block_on(
            self.client
                .lock_until(&self.lockspace, resource, mode, flags, give_up),
        )
    }

    pub fn convert(&self, lock: LockId, mode: Mode) -> Result<Grant, ClientError> {
        self.rt
            .block_on(self.client.convert(lock, mode, Flags::default(), None))
    }

    pub fn unlock(&self, lock: LockId) -> Result<(), ClientError> {
        self.rt.block_on(self.client.unlock(lock, None))
    }

    pub fn locks(&self) -> Result<Vec<ResourceView>, ClientError> {
        self.rt.block_on(self.client.locks(&self.lockspace))
    }

    pub fn recovery_done(&self, node: NodeId) -> Result<(), ClientError> {
        self.rt
            .block_on(self.client.recovery_done(node, &self.lockspace))
    }
}

pub fn map_err(e: ClientError) -> BackendError {
    match e {
        ClientError::Lock(LockError::Deadlock) => BackendError::Deadlock,
        ClientError::Ended(r) => BackendError::Lost(format!("lock session ended: {r:?}")),
        ClientError::Closed | ClientError::Frame(_) => {
            BackendError::Lost("the connection to tandem-lockd closed".into())
        }
        other => BackendError::Other(other.to_string()),
    }
}

pub fn would_block(e: &ClientError) -> bool {
    matches!(e, ClientError::Lock(LockError::WouldBlock))
}

/// A glock's resource in the mount's lockspace.
pub struct ResourceBackend {
    pub conn: Arc<LockdConn>,
    pub resource: Vec<u8>,
}

impl LockBackend for ResourceBackend {
    fn lock(&self, mode: Mode, flags: Flags) -> Result<LockId, BackendError> {
        self.conn
            .lock(&self.resource, mode, flags)
            .map(|g| g.lock)
            .map_err(map_err)
    }
    fn convert(&self, lock: LockId, mode: Mode) -> Result<(), BackendError> {
        self.conn.convert(lock, mode).map(|_| ()).map_err(map_err)
    }
    fn unlock(&self, lock: LockId) -> Result<(), BackendError> {
        self.conn.unlock(lock).map_err(map_err)
    }
}
