//! The client socket: a Unix socket (mode 0600, root or the daemon's own user only) that
//! speaks `proto::ClientRequest`/`ClientReply` frames. One connection = one session; when
//! the connection closes, for any reason, the session is closed and its locks released.

use super::core_thread::{CoreInput, Replies};
use super::flow::{Unanswered, MAX_UNANSWERED, REPLY_QUEUE};
use crate::proto::{
    ClientReply, ClientRequest, CLIENT_PROTOCOL_MAX, CLIENT_PROTOCOL_MIN, MAX_REQUEST_FRAME_BYTES,
};
use crate::table::{Command, LockError};
use crate::types::{ReqId, SessionId};
use std::sync::Arc;
use std::time::Duration;
use tandem_common::frame::{self, Channel};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::Sender;
use tokio::sync::oneshot;

const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Client connections served at once; one more is told why and closed. With the
/// per-connection bounds in `flow`, this bounds what clients can make the daemon hold.
pub const MAX_CONNECTIONS: usize = 1024;

/// Hands an input to the replica task (waits while its queue is full: backpressure).
pub async fn send_to_core(core: &Sender<CoreInput>, input: CoreInput) -> Result<(), ()> {
    core.send(input).await.map_err(|_| ())
}

pub async fn listen(listener: UnixListener, core: Sender<CoreInput>) {
    // SAFETY: geteuid has no preconditions.
    let my_uid = unsafe { libc::geteuid() };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a client failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == my_uid => {}
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), "refusing a client that is not root");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read client credentials");
                continue;
            }
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max = MAX_CONNECTIONS,
                "refusing a client: too many connections"
            );
            let (_, w) = stream.into_split();
            let mut w = BufWriter::new(w);
            tokio::spawn(async move {
                let message = format!(
                    "too many client connections ({MAX_CONNECTIONS}); close idle clients and retry"
                );
                let _ = tokio::time::timeout(HELLO_TIMEOUT, refuse::<()>(&mut w, message)).await;
            });
            continue;
        };
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, core).await {
                tracing::info!(error = %e, "client connection closed");
            }
            drop(slot);
        });
    }
}

async fn write(w: &mut BufWriter<OwnedWriteHalf>, reply: &ClientReply) -> Result<(), String> {
    frame::write_msg(w, Channel::LockClient, reply)
        .await
        .map_err(|e| e.to_string())
}

/// Tells the client why it is refused (best effort) and ends the connection with that error.
async fn refuse<T>(w: &mut BufWriter<OwnedWriteHalf>, message: String) -> Result<T, String> {
    let _ = write(
        w,
        &ClientReply::Error {
            message: message.clone(),
        },
    )
    .await;
    let _ = w.flush().await;
    Err(message)
}

async fn serve(stream: UnixStream, core: Sender<CoreInput>) -> Result<(), String> {
    let (mut r, w) = stream.into_split();
    let mut w = BufWriter::new(w);
    let hello: ClientRequest = match tokio::time::timeout(
        HELLO_TIMEOUT,
        frame::read_msg(&mut r, Channel::LockClient, MAX_REQUEST_FRAME_BYTES),
    )
    .await
    {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            return refuse(&mut w, e.to_string()).await;
        }
        Err(_) => return Err("no hello in time".into()),
    };
    let ClientRequest::Hello {
        min_version,
        max_version,
        client,
        open_session,
    } = hello
    else {
        let message = "the first message must be Hello".to_string();
        return refuse(&mut w, message).await;
    };
    let version = max_version.min(CLIENT_PROTOCOL_MAX);
    if version < min_version.max(CLIENT_PROTOCOL_MIN) {
        let message = format!(
            "no common protocol version (client {min_version}..={max_version}, daemon {CLIENT_PROTOCOL_MIN}..={CLIENT_PROTOCOL_MAX})"
        );
        return refuse(&mut w, message).await;
    }
    let unanswered = Arc::new(Unanswered::default());
    let (replies, overflow) = Replies::new(unanswered.clone());
    let session = if open_session {
        let (opened, opened_rx) = oneshot::channel();
        send_to_core(
            &core,
            CoreInput::Open {
                client,
                replies: replies.clone(),
                opened,
            },
        )
        .await
        .map_err(|_| "the replica stopped".to_string())?;
        // Welcome follows from the core once the session is committed.
        match opened_rx.await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(message)) => {
                return refuse(&mut w, message).await;
            }
            Err(_) => return Err("the replica stopped".into()),
        }
    } else {
        let _ = replies.send(ClientReply::Welcome {
            version,
            session: None,
        });
        None
    };
    // The replica writes replies into the socket itself; this task publishes the
    // socket to it and writes only what the socket did not take at once.
    let mut w = w.into_inner();
    let out = replies.out();
    let writer = tokio::spawn(async move {
        let r = out.serve(&w).await;
        let _ = w.shutdown().await;
        r.map_err(|e| e.to_string())
    });
    // A client that does not read its replies fills its queue and is dropped here.
    let result = tokio::select! {
        r = read_loop(&mut r, session, &replies, &core, &unanswered) => r,
        () = overflow.notified() => Err(format!(
            "the client does not read its replies ({REPLY_QUEUE} queued, {} requests unanswered): disconnected",
            unanswered.len()
        )),
    };
    if let Err(message) = &result {
        let _ = replies.send(ClientReply::Error {
            message: message.clone(),
        });
    }
    if let Some(s) = session {
        let _ = send_to_core(&core, CoreInput::Gone(s)).await;
    }
    replies.finish();
    drop(replies);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    result
}

async fn read_loop(
    r: &mut tokio::net::unix::OwnedReadHalf,
    session: Option<SessionId>,
    replies: &Replies,
    core: &Sender<CoreInput>,
    unanswered: &Unanswered,
) -> Result<(), String> {
    loop {
        let req: ClientRequest =
            match frame::read_msg(r, Channel::LockClient, MAX_REQUEST_FRAME_BYTES).await {
                Ok(m) => m,
                Err(frame::FrameError::Closed) => return Ok(()),
                Err(e) => return Err(format!("bad request frame: {e}")),
            };
        let no_session = |req: ReqId| ClientReply::Failed {
            req,
            lock: None,
            error: LockError::NoSession,
        };
        let id = request_id(&req);
        let release = matches!(
            req,
            ClientRequest::Unlock { .. }
                | ClientRequest::Cancel { .. }
                | ClientRequest::CancelRequest { .. }
        );
        if id == ReqId(0) && !matches!(req, ClientRequest::Hello { .. }) {
            // Id 0 would look like an already-applied duplicate and never be answered.
            let _ = replies.send(ClientReply::Failed {
                req: ReqId(0),
                lock: None,
                error: LockError::Invalid("request id 0 is reserved".into()),
            });
            continue;
        }
        let input = match (req, session) {
            (ClientRequest::Hello { .. }, _) => return Err("duplicate Hello".into()),
            (ClientRequest::Status { req }, _) => CoreInput::Status {
                req,
                replies: replies.clone(),
            },
            (ClientRequest::Locks { req, lockspace }, _) => CoreInput::Locks {
                req,
                lockspace,
                replies: replies.clone(),
            },
            (ClientRequest::Member { req, change }, Some(session)) => CoreInput::Member {
                session,
                req,
                change,
            },
            (req, None) => {
                let id = request_id(&req);
                let _ = replies.send(no_session(id));
                continue;
            }
            (req, Some(session)) => match to_command(req, session) {
                Some(cmd) => CoreInput::Submit(cmd),
                None => return Err("unexpected request".into()),
            },
        };
        // Backpressure: past MAX_UNANSWERED this waits (and reads nothing more) until
        // an answer goes out.
        unanswered.admit(id, release).await;
        send_to_core(core, input)
            .await
            .map_err(|_| "the replica stopped".to_string())?;
    }
}

const _: () = assert!(2 * MAX_UNANSWERED < REPLY_QUEUE);

fn request_id(req: &ClientRequest) -> ReqId {
    match req {
        ClientRequest::Hello { .. } => ReqId(0),
        ClientRequest::Lock { req, .. }
        | ClientRequest::Convert { req, .. }
        | ClientRequest::Unlock { req, .. }
        | ClientRequest::Cancel { req, .. }
        | ClientRequest::CancelRequest { req, .. }
        | ClientRequest::FenceAck { req, .. }
        | ClientRequest::RecoveryDone { req, .. }
        | ClientRequest::Member { req, .. }
        | ClientRequest::Status { req }
        | ClientRequest::Locks { req, .. } => *req,
    }
}

/// Session requests become log commands verbatim; the table validates them.
fn to_command(req: ClientRequest, session: SessionId) -> Option<Command> {
    Some(match req {
        ClientRequest::Lock {
            req,
            lockspace,
            resource,
            mode,
            flags,
        } => Command::Lock {
            session,
            req,
            lockspace,
            resource,
            mode,
            flags,
        },
        ClientRequest::Convert {
            req,
            lock,
            mode,
            flags,
            lvb,
        } => Command::Convert {
            session,
            req,
            lock,
            mode,
            flags,
            lvb,
        },
        ClientRequest::Unlock { req, lock, lvb } => Command::Unlock {
            session,
            req,
            lock,
            lvb,
        },
        ClientRequest::Cancel { req, lock } => Command::Cancel { session, req, lock },
        ClientRequest::CancelRequest { req, target } => Command::CancelRequest {
            session,
            req,
            target,
        },
        ClientRequest::FenceAck { req, node } => Command::FenceAck { session, req, node },
        ClientRequest::RecoveryDone {
            req,
            node,
            lockspace,
        } => Command::RecoveryDone {
            session,
            req,
            node,
            lockspace,
        },
        ClientRequest::Hello { .. }
        | ClientRequest::Member { .. }
        | ClientRequest::Status { .. }
        | ClientRequest::Locks { .. } => return None,
    })
}
