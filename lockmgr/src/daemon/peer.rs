//! Raft transport between `tandem-lockd`s: TCP, one outgoing connection per peer, every
//! connection authenticated with the cluster secret (`tandem_common::auth`, service
//! "lock-peer") before a single Raft byte is parsed — raft 0.7's protobuf 2.28 must never
//! see bytes from an unauthenticated sender.

use super::core_thread::CoreInput;
use super::direct::PeerOut;
use crate::node::Probe;
use protobuf::Message as _;
use raft::prelude::Message;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tandem_common::auth::{self, Accept};
use tandem_common::frame::{self, Channel};
use tandem_common::{ClusterConfig, NodeId};
use tokio::net::{TcpListener, TcpStream};

pub const PEER_SERVICE: &str = "lock-peer";
/// Peer protocol versions this build speaks. 1 = initial.
pub const PEER_VERSIONS: (u16, u16) = (1, 1);
/// Largest peer frame (snapshots of big lock tables travel in one message).
pub const MAX_PEER_FRAME_BYTES: u32 = 256 << 20;
const RECONNECT_DELAY: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// A protobuf-encoded raft `Message`.
    Raft(Vec<u8>),
    Probe(Probe),
}

/// Connections still in the authentication handshake at once; more are closed at once so a
/// flood of silent sockets cannot exhaust file descriptors (each handshake times out).
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// Accepts peer connections forever.
pub async fn listen(
    listener: TcpListener,
    config: Arc<ClusterConfig>,
    me: NodeId,
    secret: Arc<Vec<u8>>,
    core: tokio::sync::mpsc::Sender<CoreInput>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a peer connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%addr, "too many peer handshakes in progress; closing");
            continue;
        };
        let config = config.clone();
        let secret = secret.clone();
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_peer(stream, addr, &config, me, &secret, core, permit).await {
                tracing::info!(%addr, error = %e, "peer connection closed");
            }
        });
    }
}

async fn serve_peer(
    mut stream: TcpStream,
    addr: SocketAddr,
    config: &ClusterConfig,
    me: NodeId,
    secret: &[u8],
    core: tokio::sync::mpsc::Sender<CoreInput>,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let authed = auth::accept(&mut stream, me, PEER_SERVICE, |hello| {
        if hello.node_id == me || config.node_by_id(hello.node_id).is_none() {
            return Err(format!(
                "node {} is not a peer in this cluster",
                hello.node_id
            ));
        }
        Ok(Accept {
            secret: secret.to_vec(),
            version: auth::negotiate(hello, PEER_VERSIONS)?,
        })
    })
    .await
    .map_err(|e| format!("handshake from {addr} failed: {e}"))?;
    drop(handshake);
    let peer = authed.peer;
    loop {
        let frame: PeerFrame =
            frame::read_msg(&mut stream, Channel::LockPeer, MAX_PEER_FRAME_BYTES)
                .await
                .map_err(|e| e.to_string())?;
        let input = match frame {
            PeerFrame::Raft(bytes) => {
                let msg = Message::parse_from_bytes(&bytes)
                    .map_err(|e| format!("undecodable raft message from node {peer}: {e}"))?;
                // An authenticated peer still may not speak for another node.
                if msg.from != u64::from(peer.0) || msg.to != u64::from(me.0) {
                    return Err(format!(
                        "node {peer} sent a message from {} to {}",
                        msg.from, msg.to
                    ));
                }
                CoreInput::Raft(Box::new(msg))
            }
            PeerFrame::Probe(p) => CoreInput::Probe(peer, p),
        };
        // The replica's queue is bounded: waiting here stops reading this peer.
        core.send(input)
            .await
            .map_err(|_| "the replica stopped".to_string())?;
    }
}

/// Keeps one authenticated connection to `peer`, through which the replica writes
/// (`PeerOut`).
pub async fn dial_forever(
    peer: NodeId,
    addr: SocketAddr,
    me: NodeId,
    secret: Arc<Vec<u8>>,
    out: Arc<PeerOut>,
) {
    loop {
        match connect(peer, addr, me, &secret).await {
            Ok(stream) => {
                tracing::info!(%peer, %addr, "connected to peer");
                if let Err(e) = out.serve(&stream).await {
                    tracing::info!(%peer, error = %e, "peer connection lost");
                }
            }
            Err(e) => tracing::debug!(%peer, %addr, error = %e, "cannot reach peer"),
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

async fn connect(
    peer: NodeId,
    addr: SocketAddr,
    me: NodeId,
    secret: &[u8],
) -> Result<TcpStream, String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    auth::dial(
        &mut stream,
        secret,
        PEER_SERVICE,
        PEER_VERSIONS,
        me,
        peer,
        "",
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(stream)
}
