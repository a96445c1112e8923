//! Mutual challenge-response authentication with a shared secret (HMAC-SHA256), run on every
//! peer connection before anything else is parsed. Used by the replicator and the lock
//! manager. Flow (all frames on `Channel::Handshake`, each at most `MAX_HANDSHAKE_FRAME`):
//!
//! ```text
//! dialer  -> ClientHello { service, versions, node id, target, nonce_c }
//! acceptor-> ServerHello { version, node id, nonce_s, proof_s = HMAC(k, "server" | transcript) }
//!            or Refused { reason }
//! dialer  -> ClientProof { proof_c = HMAC(k, "client" | transcript) }
//! acceptor-> Welcome, or Refused { reason }
//! ```
//!
//! The transcript binds both nonces, the service, the target, both node ids and the
//! chosen version, so a proof cannot be replayed on another connection or role.
//! The whole handshake has a deadline so a silent peer cannot hold a slot forever.

use crate::frame::{self, Channel, FrameError};
use crate::ids::NodeId;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub const MAX_HANDSHAKE_FRAME: u32 = 1024;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_MAGIC: [u8; 8] = *b"TANDEM\0\x01";

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientHello {
    pub magic: [u8; 8],
    /// "replication", "lock-peer", …
    pub service: String,
    pub min_version: u16,
    pub max_version: u16,
    pub node_id: NodeId,
    /// Resource name for replication; empty for the lock manager.
    pub target: String,
    pub nonce: [u8; 32],
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum ServerMsg {
    Hello {
        version: u16,
        node_id: NodeId,
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    Welcome,
    Refused {
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientProof {
    pub proof: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("handshake frame error: {0}")]
    Frame(#[from] FrameError),
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("peer refused the connection: {0}")]
    Refused(String),
    #[error("authentication failed: {0}")]
    BadProof(&'static str),
    #[error("protocol mismatch: {0}")]
    Mismatch(String),
}

/// What the acceptor learned about an authenticated dialer.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub peer: NodeId,
    pub target: String,
    pub version: u16,
}

/// The acceptor's policy for an incoming hello: which secret, which version, or a refusal.
pub struct Accept {
    pub secret: Vec<u8>,
    pub version: u16,
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn transcript(
    hello: &ClientHello,
    version: u16,
    server_id: NodeId,
    server_nonce: &[u8; 32],
) -> Vec<u8> {
    let mut t = frame::encode(Channel::Handshake, hello).unwrap_or_default();
    t.extend_from_slice(&version.to_le_bytes());
    t.push(server_id.0);
    t.extend_from_slice(server_nonce);
    t
}

fn proof(secret: &[u8], label: &[u8], transcript: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(transcript);
    mac.finalize().into_bytes().into()
}

fn check(secret: &[u8], label: &[u8], transcript: &[u8], tag: &[u8; 32]) -> bool {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(transcript);
    mac.verify_slice(tag).is_ok()
}

/// Dialer side. Returns the negotiated version once both sides proved the secret.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: &[u8],
    service: &str,
    versions: (u16, u16),
    my_id: NodeId,
    expect_peer: NodeId,
    target: &str,
) -> Result<u16, AuthError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let hello = ClientHello {
            magic: HELLO_MAGIC,
            service: service.to_string(),
            min_version: versions.0,
            max_version: versions.1,
            node_id: my_id,
            target: target.to_string(),
            nonce: nonce(),
        };
        frame::write_msg(stream, Channel::Handshake, &hello).await?;
        stream.flush().await.map_err(FrameError::Io)?;
        let reply: ServerMsg =
            frame::read_msg(stream, Channel::Handshake, MAX_HANDSHAKE_FRAME).await?;
        let (version, server_id, server_nonce, server_proof) = match reply {
            ServerMsg::Hello {
                version,
                node_id,
                nonce,
                proof,
            } => (version, node_id, nonce, proof),
            ServerMsg::Refused { reason } => return Err(AuthError::Refused(reason)),
            ServerMsg::Welcome => return Err(AuthError::Mismatch("unexpected Welcome".into())),
        };
        if server_id != expect_peer {
            return Err(AuthError::Mismatch(format!(
                "expected node {expect_peer}, peer says it is node {server_id}"
            )));
        }
        if version < versions.0 || version > versions.1 {
            return Err(AuthError::Mismatch(format!(
                "peer chose version {version}, outside {}..={}",
                versions.0, versions.1
            )));
        }
        let t = transcript(&hello, version, server_id, &server_nonce);
        if !check(secret, b"tandem-server", &t, &server_proof) {
            return Err(AuthError::BadProof(
                "the peer does not know the shared secret",
            ));
        }
        let mine = ClientProof {
            proof: proof(secret, b"tandem-client", &t),
        };
        frame::write_msg(stream, Channel::Handshake, &mine).await?;
        stream.flush().await.map_err(FrameError::Io)?;
        match frame::read_msg(stream, Channel::Handshake, MAX_HANDSHAKE_FRAME).await? {
            ServerMsg::Welcome => Ok(version),
            ServerMsg::Refused { reason } => Err(AuthError::Refused(reason)),
            ServerMsg::Hello { .. } => Err(AuthError::Mismatch("unexpected second Hello".into())),
        }
    })
    .await
    .map_err(|_| AuthError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// Acceptor side. `policy` sees the (unauthenticated) hello and either returns the secret
/// and version to use or a refusal reason that is sent back to the dialer.
pub async fn accept<S, F>(
    stream: &mut S,
    my_id: NodeId,
    service: &str,
    policy: F,
) -> Result<Authenticated, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&ClientHello) -> Result<Accept, String>,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let hello: ClientHello =
            frame::read_msg(stream, Channel::Handshake, MAX_HANDSHAKE_FRAME).await?;
        let refuse = |reason: String| ServerMsg::Refused { reason };
        let decision = if hello.magic != HELLO_MAGIC {
            Err("bad hello magic".to_string())
        } else if hello.service != service {
            Err(format!(
                "this port serves {service:?}, not {:?}",
                hello.service
            ))
        } else if hello.min_version > hello.max_version {
            Err("empty version range".to_string())
        } else {
            policy(&hello)
        };
        let accept = match decision {
            Ok(a) => a,
            Err(reason) => {
                let _ = frame::write_msg(stream, Channel::Handshake, &refuse(reason.clone())).await;
                let _ = stream.flush().await;
                return Err(AuthError::Refused(reason));
            }
        };
        let server_nonce = nonce();
        let t = transcript(&hello, accept.version, my_id, &server_nonce);
        let msg = ServerMsg::Hello {
            version: accept.version,
            node_id: my_id,
            nonce: server_nonce,
            proof: proof(&accept.secret, b"tandem-server", &t),
        };
        frame::write_msg(stream, Channel::Handshake, &msg).await?;
        stream.flush().await.map_err(FrameError::Io)?;
        let client: ClientProof =
            match frame::read_msg(stream, Channel::Handshake, MAX_HANDSHAKE_FRAME).await {
                Ok(p) => p,
                // The dialer checks our proof first and hangs up when it is wrong.
                Err(FrameError::Closed) => {
                    return Err(AuthError::BadProof(
                        "the dialer hung up after our proof: the shared secrets differ",
                    ))
                }
                Err(e) => return Err(e.into()),
            };
        if !check(&accept.secret, b"tandem-client", &t, &client.proof) {
            let reason = "authentication failed: wrong shared secret".to_string();
            let _ = frame::write_msg(stream, Channel::Handshake, &refuse(reason)).await;
            let _ = stream.flush().await;
            return Err(AuthError::BadProof(
                "the dialer does not know the shared secret",
            ));
        }
        frame::write_msg(stream, Channel::Handshake, &ServerMsg::Welcome).await?;
        stream.flush().await.map_err(FrameError::Io)?;
        Ok(Authenticated {
            peer: hello.node_id,
            target: hello.target,
            version: accept.version,
        })
    })
    .await
    .map_err(|_| AuthError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// Picks the highest version both sides speak.
pub fn negotiate(hello: &ClientHello, mine: (u16, u16)) -> Result<u16, String> {
    let lo = hello.min_version.max(mine.0);
    let hi = hello.max_version.min(mine.1);
    if lo > hi {
        Err(format!(
            "no common protocol version (peer {}..={}, ours {}..={})",
            hello.min_version, hello.max_version, mine.0, mine.1
        ))
    } else {
        Ok(hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(client_secret: &'static [u8], server_secret: &'static [u8]) -> (bool, bool) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let client = tokio::spawn(async move {
            dial(
                &mut a,
                client_secret,
                "replication",
                (1, 2),
                NodeId(1),
                NodeId(2),
                "www",
            )
            .await
        });
        let server = tokio::spawn(async move {
            accept(&mut b, NodeId(2), "replication", |h| {
                Ok(Accept {
                    secret: server_secret.to_vec(),
                    version: negotiate(h, (1, 1))?,
                })
            })
            .await
        });
        let c = client.await.unwrap();
        let s = server.await.unwrap();
        (c.is_ok(), s.is_ok())
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ways() {
        assert_eq!(run(b"secret-one", b"secret-one").await, (true, true));
    }

    #[tokio::test]
    async fn wrong_secret_fails_both_ways() {
        assert_eq!(run(b"secret-one", b"secret-two").await, (false, false));
    }

    #[tokio::test]
    async fn garbage_is_refused_without_panic() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let _ = a.write_all(&[0x55; 300]).await;
        });
        let r = accept(&mut b, NodeId(2), "replication", |_| {
            Ok(Accept {
                secret: b"x".to_vec(),
                version: 1,
            })
        })
        .await;
        assert!(r.is_err());
    }
}
