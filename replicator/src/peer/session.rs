//! One authenticated connection: a writer task (batches frames, sends pings when idle), a
//! reader loop (acks and state directly; data in order to the apply task) and the apply
//! task (disk writes in stream order). Any error ends the whole session.

use std::sync::Arc;
use std::time::Duration;

use tandem_common::frame::{self, Channel, FrameError};
use tandem_common::NodeId;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::engine::SessionEnd;
use crate::engine::{Conn, Resource};
use crate::proto::{AckMode, PeerMsg, MAX_FRAME_BYTES};

/// Frames queued for sending; a full queue blocks writers (backpressure).
const OUT_QUEUE_FRAMES: usize = 512;
/// Ordered messages waiting for the apply task.
const APPLY_QUEUE_MSGS: usize = 256;
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// No frame at all for this long means the link is dead (DRBD's ping-timeout/timeout).
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run_session(res: Arc<Resource>, peer: NodeId, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Arc<Vec<u8>>>(OUT_QUEUE_FRAMES);
    // Our first `State` is queued already (handshake.rs).
    let conn = res.open_conn(peer, tx).await;
    let writer = tokio::spawn(writer_task(wr, rx, conn.clone()));
    let (apply_tx, apply_rx) = mpsc::channel::<PeerMsg>(APPLY_QUEUE_MSGS);
    let mut applier = tokio::spawn(apply_task(res.clone(), conn.clone(), apply_rx));
    let end = tokio::select! {
        end = reader_loop(&res, &conn, rd, apply_tx) => end,
        r = &mut applier => match r {
            Ok(end) => end,
            Err(e) => SessionEnd { reason: format!("apply task failed: {e}"), standalone: false },
        },
    };
    conn.close();
    writer.abort();
    applier.abort();
    res.handshake_finished(&conn);
    res.after_session(&conn, &end).await;
    conn.session_ended();
}

async fn writer_task(wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Arc<Vec<u8>>>, conn: Arc<Conn>) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let ping = Arc::new(frame::encode(Channel::Replication, &PeerMsg::Ping).expect("ping encodes"));
    loop {
        let first = match tokio::time::timeout(PING_INTERVAL, rx.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => ping.clone(),
        };
        if w.write_all(&first).await.is_err() {
            break;
        }
        // Batch whatever else is queued into the same flush.
        while let Ok(f) = rx.try_recv() {
            if w.write_all(&f).await.is_err() {
                conn.close();
                return;
            }
        }
        if w.flush().await.is_err() {
            break;
        }
    }
    conn.close();
}

async fn reader_loop(
    res: &Arc<Resource>,
    conn: &Arc<Conn>,
    mut rd: OwnedReadHalf,
    apply_tx: mpsc::Sender<PeerMsg>,
) -> SessionEnd {
    let mut closed = conn.closed_watch();
    let mut seen_state = false;
    let mut rd = tokio::io::BufReader::with_capacity(256 * 1024, &mut rd);
    loop {
        if *closed.borrow() {
            return SessionEnd {
                reason: "connection closed locally".into(),
                standalone: false,
            };
        }
        let msg: PeerMsg = tokio::select! {
            _ = closed.changed() => continue,
            r = tokio::time::timeout(PEER_TIMEOUT, frame::read_msg(&mut rd, Channel::Replication, MAX_FRAME_BYTES)) => match r {
                Err(_) => return SessionEnd { reason: format!("no data from peer for {PEER_TIMEOUT:?} (NetworkFailure)"), standalone: false },
                Ok(Err(FrameError::Closed)) => return SessionEnd { reason: "peer closed the connection".into(), standalone: false },
                Ok(Err(e)) => {
                    tracing::error!(resource = %res.name(), peer = %conn.peer, error = %e, "protocol error from peer");
                    return SessionEnd { reason: format!("protocol error: {e}"), standalone: false };
                }
                Ok(Ok(m)) => m,
            },
        };
        if !seen_state && !matches!(msg, PeerMsg::State(_) | PeerMsg::Ping | PeerMsg::Pong) {
            return SessionEnd {
                reason: format!("protocol error: {} before State", msg.kind()),
                standalone: false,
            };
        }
        match msg {
            PeerMsg::State(st) => {
                let first = !seen_state;
                seen_state = true;
                if let Err(end) = res.on_peer_state(conn, st, first).await {
                    if end.standalone {
                        // Let the peer read our State and reach the same verdict: closing
                        // with unread input would send a RST that can destroy it.
                        drain_until_eof(&mut rd, Duration::from_secs(2)).await;
                    }
                    return end;
                }
            }
            PeerMsg::RecvAck { seq } | PeerMsg::WriteAck { seq } => conn.complete(seq, Ok(())),
            PeerMsg::NegAck { seq, reason } => conn.complete(seq, Err(reason)),
            PeerMsg::VerifyReply { seq, crcs } => conn.complete_verify(seq, crcs),
            PeerMsg::ReadReply { seq, data, error } => {
                conn.complete_read(seq, error.map_or(Ok(data), Err))
            }
            PeerMsg::Ping => {
                conn.send(&PeerMsg::Pong).await;
            }
            PeerMsg::Pong => {}
            other => {
                if let PeerMsg::Write {
                    seq,
                    ack: AckMode::Recv,
                    ..
                }
                | PeerMsg::Zero {
                    seq,
                    ack: AckMode::Recv,
                    ..
                } = &other
                {
                    conn.send(&PeerMsg::RecvAck { seq: *seq }).await;
                }
                if apply_tx.send(other).await.is_err() {
                    return SessionEnd {
                        reason: "apply task ended".into(),
                        standalone: false,
                    };
                }
            }
        }
    }
}

async fn apply_task(
    res: Arc<Resource>,
    conn: Arc<Conn>,
    mut rx: mpsc::Receiver<PeerMsg>,
) -> SessionEnd {
    while let Some(msg) = rx.recv().await {
        if let Err(end) = res.apply_in_order(&conn, msg).await {
            return end;
        }
    }
    SessionEnd {
        reason: "session ended".into(),
        standalone: false,
    }
}

/// Reads and discards until the peer closes (or the timeout passes).
async fn drain_until_eof<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, timeout: Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(timeout, async {
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
