//! Peer links over TCP. For each resource and pair of nodes there is one connection; the
//! node with the lower id dials (with backoff), the other accepts. Every connection first
//! runs the shared-secret challenge-response (`tandem_common::auth`); nothing else from the
//! peer is parsed before it succeeds.

mod session;

pub use session::run_session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_common::auth;
use tandem_common::NodeId;
use tokio::net::TcpStream;

use crate::engine::Resource;
use crate::proto::{PROTO_VERSION, SERVICE};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// The refusal a lower-id node sends a higher-id one: "I dial you" (see `knock`).
pub const KNOCK_REPLY: &str = "the node with the lower id dials; dialing you now";

/// Keeps a connection to `peer` up while the resource is up and not StandAlone.
pub async fn dial_loop(res: Arc<Resource>, peer: NodeId, addr: SocketAddr) {
    let mut backoff = BACKOFF_MIN;
    let mut logged = false;
    loop {
        if res.is_down() {
            return;
        }
        let standalone = res.peer_view(peer).is_none_or(|p| p.standalone);
        if standalone {
            let _ = tokio::time::timeout(Duration::from_secs(1), res.wake.notified()).await;
            continue;
        }
        match connect(&res, peer, addr).await {
            Ok(stream) => {
                backoff = BACKOFF_MIN;
                logged = false;
                tracing::info!(resource = %res.name(), %peer, %addr, "connected and authenticated");
                run_session(res.clone(), peer, stream).await;
            }
            Err(e) => {
                if !logged {
                    tracing::info!(resource = %res.name(), %peer, %addr, error = %e, "cannot connect yet; retrying with backoff");
                    logged = true;
                }
                res.note_connect_error(peer, &e);
                let _ = tokio::time::timeout(backoff, res.wake.notified()).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Tells a lower-id peer that we are up, so that its dialer retries now instead of at the
/// end of its backoff (up to 3 s after a long outage): it refuses our hello ("the lower id
/// dials") and wakes its dialer. One attempt; if the peer is down, it dials us when it
/// comes up anyway.
pub async fn knock(res: Arc<Resource>, peer: NodeId, addr: SocketAddr) {
    let Ok(Ok(mut stream)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await
    else {
        return;
    };
    let knocked = tokio::time::timeout(CONNECT_TIMEOUT, hello(&res, peer, &mut stream)).await;
    tracing::debug!(resource = %res.name(), %peer, ?knocked, "knocked: the lower-id peer dials us now");
}

async fn connect(res: &Resource, peer: NodeId, addr: SocketAddr) -> Result<TcpStream, String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    hello(res, peer, &mut stream).await.map_err(|e| {
        tracing::warn!(resource = %res.name(), %peer, error = %e, "handshake with peer failed");
        e.to_string()
    })?;
    Ok(stream)
}

/// Our side of the shared-secret handshake, as the dialer of `peer`.
async fn hello(
    res: &Resource,
    peer: NodeId,
    stream: &mut TcpStream,
) -> Result<u16, auth::AuthError> {
    auth::dial(
        stream,
        &res.settings.secret,
        SERVICE,
        (PROTO_VERSION, PROTO_VERSION),
        res.settings.node_id,
        peer,
        res.name(),
    )
    .await
}

/// Acceptor policy: the hello must name a resource that is up here, come from one of its
/// members with a lower node id, and that peer must not be StandAlone.
pub fn accept_policy(
    res: Option<&Arc<Resource>>,
    hello: &auth::ClientHello,
) -> Result<auth::Accept, String> {
    let res = res.ok_or_else(|| format!("resource {:?} is not up on this node", hello.target))?;
    let member = res
        .settings
        .peers
        .iter()
        .any(|(id, _)| *id == hello.node_id);
    if !member {
        return Err(format!(
            "node {} is not a member of resource {}",
            hello.node_id,
            res.name()
        ));
    }
    if hello.node_id >= res.settings.node_id {
        if hello.node_id > res.settings.node_id {
            // A knock (see `knock`): the peer is up, dial it now rather than after the
            // backoff. Unauthenticated, so it can only make us dial a configured peer early.
            res.wake.notify_waiters();
            return Err(KNOCK_REPLY.into());
        }
        return Err("the node with the lower id dials; this node dials you".into());
    }
    if res.peer_view(hello.node_id).is_some_and(|p| p.standalone) {
        return Err("StandAlone: run `tandemadm connect` on this node first".into());
    }
    Ok(auth::Accept {
        secret: res.settings.secret.clone(),
        version: auth::negotiate(hello, (PROTO_VERSION, PROTO_VERSION))?,
    })
}
