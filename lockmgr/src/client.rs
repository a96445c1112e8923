//! Async client library for `tandem-lockd` (used by `mount.tandem` and `tandem-lockctl`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tandem_lockmgr::client::ClientError> {
//! use tandem_lockmgr::client::Client;
//! use tandem_lockmgr::types::{Flags, Mode};
//! let mut client = Client::connect("/run/tandem/n1/lockd.sock".as_ref(), "demo").await?;
//! let mut callbacks = client.take_callbacks().expect("first call");
//! let grant = client.lock("c:www", b"inode-42", Mode::EX, Flags::default()).await?;
//! // ... use grant.token to fence writes; on a Blocking callback for grant.lock, release:
//! client.unlock(grant.lock, None).await?;
//! # drop(callbacks.try_recv()); Ok(()) }
//! ```
//!
//! Every lock belongs to this connection's session: dropping the `Client` (or the process
//! dying) releases them all. A `Callback::Ended` means the daemon ended the session (node
//! declared down, daemon restarted): every lock is void and I/O guarded by them must stop.

use crate::node::{CoreStatus, MemberChange};
use crate::proto::{
    ClientReply, ClientRequest, CLIENT_PROTOCOL_MAX, CLIENT_PROTOCOL_MIN, MAX_CLIENT_FRAME_BYTES,
};
use crate::table::{EndReason, LockError, ResourceView};
use crate::types::{FencingToken, Flags, LockId, Lvb, Mode, ReqId, SessionId};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tandem_common::frame::{self, Channel, FrameError};
use tandem_common::NodeId;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the lock daemon at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("lock daemon connection: {0}")]
    Frame(#[from] FrameError),
    #[error("the lock daemon refused: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("the session ended ({0:?}); every lock it held is void")]
    Ended(EndReason),
    #[error("the connection to the lock daemon closed")]
    Closed,
}

/// A granted lock or conversion.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub lock: LockId,
    pub mode: Mode,
    /// Larger than every earlier grant's token, cluster-wide.
    pub token: FencingToken,
    pub lvb: Lvb,
    pub lvb_valid: bool,
}

/// Asynchronous notifications.
#[derive(Clone, Debug, PartialEq)]
pub enum Callback {
    /// Someone waits for `wanted` on the resource of `lock`: lower or release it.
    Blocking { lock: LockId, wanted: Mode },
    /// The session is gone; all locks are void.
    Ended(EndReason),
}

type Pending = Arc<Mutex<HashMap<ReqId, oneshot::Sender<ClientReply>>>>;

pub struct Client {
    out: mpsc::UnboundedSender<ClientRequest>,
    /// The reader saw the connection end.
    closed: Arc<std::sync::atomic::AtomicBool>,
    pending: Pending,
    callbacks: Option<mpsc::UnboundedReceiver<Callback>>,
    next_req: AtomicU64,
    session: Option<SessionId>,
}

impl Client {
    /// Connects and opens a session (waits until the cluster has committed it).
    pub async fn connect(path: &Path, name: &str) -> Result<Self, ClientError> {
        Self::open(path, name, true).await
    }

    /// Connects without a session: `status` and `locks` only; works without quorum.
    pub async fn connect_status_only(path: &Path) -> Result<Self, ClientError> {
        Self::open(path, "status", false).await
    }

    async fn open(path: &Path, name: &str, open_session: bool) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (mut r, w) = stream.into_split();
        let mut w = BufWriter::new(w);
        let hello = ClientRequest::Hello {
            min_version: CLIENT_PROTOCOL_MIN,
            max_version: CLIENT_PROTOCOL_MAX,
            client: name.to_string(),
            open_session,
        };
        frame::write_msg(&mut w, Channel::LockClient, &hello).await?;
        w.flush().await.map_err(FrameError::Io)?;
        let session =
            match frame::read_msg(&mut r, Channel::LockClient, MAX_CLIENT_FRAME_BYTES).await? {
                ClientReply::Welcome { session, .. } => session,
                ClientReply::Error { message } => return Err(ClientError::Refused(message)),
                ClientReply::Ended { reason } => return Err(ClientError::Ended(reason)),
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected Welcome, got {other:?}"
                    )))
                }
            };
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (cb_tx, cb_rx) = mpsc::unbounded_channel();
        let (out, mut out_rx) = mpsc::unbounded_channel::<ClientRequest>();
        tokio::spawn(async move {
            while let Some(first) = out_rx.recv().await {
                if frame::write_msg(&mut w, Channel::LockClient, &first)
                    .await
                    .is_err()
                {
                    return;
                }
                while let Ok(more) = out_rx.try_recv() {
                    if frame::write_msg(&mut w, Channel::LockClient, &more)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if w.flush().await.is_err() {
                    return;
                }
            }
        });
        let routes = pending.clone();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader_closed = closed.clone();
        tokio::spawn(async move {
            loop {
                let reply: ClientReply = match frame::read_msg(
                    &mut r,
                    Channel::LockClient,
                    MAX_CLIENT_FRAME_BYTES,
                )
                .await
                {
                    Ok(m) => m,
                    Err(_) => break,
                };
                let req = match &reply {
                    ClientReply::Granted { req, .. }
                    | ClientReply::Failed { req, .. }
                    | ClientReply::Unlocked { req, .. }
                    | ClientReply::Done { req }
                    | ClientReply::Status { req, .. }
                    | ClientReply::Locks { req, .. } => *req,
                    ClientReply::Blocking { lock, wanted } => {
                        let _ = cb_tx.send(Callback::Blocking {
                            lock: *lock,
                            wanted: *wanted,
                        });
                        continue;
                    }
                    ClientReply::Ended { reason } => {
                        let _ = cb_tx.send(Callback::Ended(reason.clone()));
                        break;
                    }
                    ClientReply::Error { .. } | ClientReply::Welcome { .. } => break,
                };
                if let Some(tx) = routes.lock().remove(&req) {
                    let _ = tx.send(reply);
                }
            }
            // Waiters see `Closed` when their sender is dropped; later callers see the flag
            // (set first, so a request registered after the clear cannot wait forever).
            reader_closed.store(true, Ordering::SeqCst);
            routes.lock().clear();
        });
        Ok(Client {
            out,
            pending,
            closed,
            callbacks: Some(cb_rx),
            next_req: AtomicU64::new(1),
            session,
        })
    }

    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The blocking-callback stream; `None` after the first call.
    pub fn take_callbacks(&mut self) -> Option<mpsc::UnboundedReceiver<Callback>> {
        self.callbacks.take()
    }

    fn next(&self) -> ReqId {
        ReqId(self.next_req.fetch_add(1, Ordering::Relaxed))
    }

    /// Registers a reply route; fails if the connection already closed.
    fn register(&self, req: ReqId, tx: oneshot::Sender<ClientReply>) -> Result<(), ClientError> {
        self.pending.lock().insert(req, tx);
        if self.closed.load(Ordering::SeqCst) {
            self.pending.lock().remove(&req);
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    async fn call(&self, req: ReqId, msg: ClientRequest) -> Result<ClientReply, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.register(req, tx)?;
        self.out.send(msg).map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    fn grant(reply: ClientReply) -> Result<Grant, ClientError> {
        match reply {
            ClientReply::Granted {
                lock,
                mode,
                token,
                lvb,
                lvb_valid,
                ..
            } => Ok(Grant {
                lock,
                mode,
                token,
                lvb,
                lvb_valid,
            }),
            ClientReply::Failed { error, .. } => Err(error.into()),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    fn done(reply: ClientReply) -> Result<(), ClientError> {
        match reply {
            ClientReply::Done { .. } | ClientReply::Unlocked { .. } => Ok(()),
            ClientReply::Failed { error, .. } => Err(error.into()),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Requests a new lock; resolves when granted (or fails: NOQUEUE, cancel, ...).
    pub async fn lock(
        &self,
        lockspace: &str,
        resource: &[u8],
        mode: Mode,
        flags: Flags,
    ) -> Result<Grant, ClientError> {
        let req = self.next();
        let msg = ClientRequest::Lock {
            req,
            lockspace: lockspace.to_string(),
            resource: resource.to_vec(),
            mode,
            flags,
        };
        Self::grant(self.call(req, msg).await?)
    }

    /// Like `lock`, but gives up after `timeout`: the request is cancelled and
    /// `LockError::Cancelled` returned — unless the grant won the race, in which case the
    /// grant is returned as usual.
    pub async fn lock_timeout(
        &self,
        lockspace: &str,
        resource: &[u8],
        mode: Mode,
        flags: Flags,
        timeout: std::time::Duration,
    ) -> Result<Grant, ClientError> {
        self.lock_until(
            lockspace,
            resource,
            mode,
            flags,
            tokio::time::sleep(timeout),
        )
        .await
    }

    /// Like `lock`, but gives up when `give_up` completes first: the waiting request is
    /// cancelled and `LockError::Cancelled` returned — unless the grant won the race, in
    /// which case the grant is returned as usual (the caller then owns the lock).
    pub async fn lock_until(
        &self,
        lockspace: &str,
        resource: &[u8],
        mode: Mode,
        flags: Flags,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<Grant, ClientError> {
        let req = self.next();
        let (tx, mut rx) = oneshot::channel();
        self.register(req, tx)?;
        let msg = ClientRequest::Lock {
            req,
            lockspace: lockspace.to_string(),
            resource: resource.to_vec(),
            mode,
            flags,
        };
        self.out.send(msg).map_err(|_| ClientError::Closed)?;
        tokio::select! {
            reply = &mut rx => return Self::grant(reply.map_err(|_| ClientError::Closed)?),
            () = give_up => {}
        }
        let cancel = self.next();
        // The cancel's own reply (Done, or NotPending if the grant came first) does not
        // matter: the lock request's outcome arrives on `rx` either way.
        let (ctx, _crx) = oneshot::channel();
        self.register(cancel, ctx)?;
        let msg = ClientRequest::CancelRequest {
            req: cancel,
            target: req,
        };
        self.out.send(msg).map_err(|_| ClientError::Closed)?;
        Self::grant(rx.await.map_err(|_| ClientError::Closed)?)
    }

    /// Converts a held lock; `lvb` is stored when lowering from PW/EX.
    pub async fn convert(
        &self,
        lock: LockId,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
    ) -> Result<Grant, ClientError> {
        let req = self.next();
        let msg = ClientRequest::Convert {
            req,
            lock,
            mode,
            flags,
            lvb,
        };
        Self::grant(self.call(req, msg).await?)
    }

    /// Releases a lock; `lvb` is stored when releasing PW/EX.
    pub async fn unlock(&self, lock: LockId, lvb: Option<Lvb>) -> Result<(), ClientError> {
        let req = self.next();
        Self::done(
            self.call(req, ClientRequest::Unlock { req, lock, lvb })
                .await?,
        )
    }

    /// Cancels a queued request or conversion of `lock`.
    pub async fn cancel(&self, lock: LockId) -> Result<(), ClientError> {
        let req = self.next();
        Self::done(self.call(req, ClientRequest::Cancel { req, lock }).await?)
    }

    pub async fn fence_ack(&self, node: NodeId) -> Result<(), ClientError> {
        let req = self.next();
        Self::done(
            self.call(req, ClientRequest::FenceAck { req, node })
                .await?,
        )
    }

    pub async fn recovery_done(&self, node: NodeId, lockspace: &str) -> Result<(), ClientError> {
        let req = self.next();
        let msg = ClientRequest::RecoveryDone {
            req,
            node,
            lockspace: lockspace.to_string(),
        };
        Self::done(self.call(req, msg).await?)
    }

    pub async fn member(&self, change: MemberChange) -> Result<(), ClientError> {
        let req = self.next();
        Self::done(
            self.call(req, ClientRequest::Member { req, change })
                .await?,
        )
    }

    pub async fn status(&self) -> Result<CoreStatus, ClientError> {
        let req = self.next();
        match self.call(req, ClientRequest::Status { req }).await? {
            ClientReply::Status { status, .. } => Ok(status),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn locks(&self, lockspace: &str) -> Result<Vec<ResourceView>, ClientError> {
        let req = self.next();
        let msg = ClientRequest::Locks {
            req,
            lockspace: lockspace.to_string(),
        };
        match self.call(req, msg).await? {
            ClientReply::Locks { resources, .. } => Ok(resources),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }
}
