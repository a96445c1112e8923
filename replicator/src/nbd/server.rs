//! NBD export of one resource on a Unix socket: fixed-newstyle handshake (EXPORT_NAME,
//! INFO, GO, LIST, ABORT), then transmission with READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
//! DISC and FUA. Requests run concurrently (bounded); replies may come out of order, which
//! NBD allows. Any malformed input ends that client's connection with a logged reason.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::proto::*;
use crate::engine::{IoError, Resource};

/// Requests processed at once per client; more wait (backpressure, bounded memory).
const MAX_INFLIGHT_PER_CLIENT: usize = 128;
/// Payload bytes buffered at once by all clients of one export (reads and writes), in
/// 4 KiB units: a flood of large requests waits here instead of growing memory.
const BUDGET_BYTES: usize = 256 << 20;
/// One client's share of that budget, so a client that does not read its read replies
/// cannot hold all of it.
const CLIENT_BUDGET_BYTES: usize = 64 << 20;
const BUDGET_UNIT: usize = 4096;
/// A client that takes no reply for this long is disconnected (its queued replies free
/// their buffers).
const REPLY_STALL: std::time::Duration = std::time::Duration::from_secs(30);

fn budget_units(len: u32) -> u32 {
    (len as usize).div_ceil(BUDGET_UNIT).max(1) as u32
}

#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Parse(#[from] NbdParseError),
    #[error("{0}")]
    Protocol(String),
}

/// Binds the export socket (replacing a stale one) and serves until the task is aborted.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, res: Arc<Resource>, path: PathBuf) {
    tracing::info!(resource = %res.name(), socket = %path.display(), "NBD export ready");
    let budget = Arc::new(Semaphore::new(BUDGET_BYTES / BUDGET_UNIT));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let res = res.clone();
        let budget = budget.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_client(stream, res.clone(), budget).await {
                tracing::warn!(resource = %res.name(), error = %e, "NBD client disconnected with an error");
            }
        });
    }
}

fn transmission_flags() -> u16 {
    TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN
}

async fn handle_client(
    stream: UnixStream,
    res: Arc<Resource>,
    budget: Arc<Semaphore>,
) -> Result<(), ClientError> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut wr = BufWriter::new(wr);
    wr.write_all(&NBDMAGIC.to_be_bytes()).await?;
    wr.write_all(&IHAVEOPT.to_be_bytes()).await?;
    wr.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    wr.flush().await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 || client_flags & !3 != 0 {
        return Err(ClientError::Protocol(format!(
            "client flags {client_flags:#x}: only fixed-newstyle clients are supported"
        )));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let size = res.usable_bytes();
    // Option haggling.
    loop {
        let magic = rd.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ClientError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_BYTES {
            return Err(NbdParseError::OptionTooLarge(len).into());
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !name.is_empty() && name != res.name() {
                    return Err(ClientError::Protocol(format!("unknown export {name:?}")));
                }
                wr.write_all(&size.to_be_bytes()).await?;
                wr.write_all(&transmission_flags().to_be_bytes()).await?;
                if !no_zeroes {
                    wr.write_all(&[0u8; 124]).await?;
                }
                wr.flush().await?;
                break;
            }
            OPT_ABORT => {
                wr.write_all(&option_reply(option, REP_ACK, &[])).await?;
                wr.flush().await?;
                return Ok(());
            }
            OPT_LIST => {
                let mut d = (res.name().len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(res.name().as_bytes());
                wr.write_all(&option_reply(option, REP_SERVER, &d)).await?;
                wr.write_all(&option_reply(option, REP_ACK, &[])).await?;
                wr.flush().await?;
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_go(&data) {
                    Ok(v) => v,
                    Err(e) => {
                        let msg = e.to_string();
                        wr.write_all(&option_reply(option, REP_ERR_INVALID, msg.as_bytes()))
                            .await?;
                        wr.flush().await?;
                        continue;
                    }
                };
                if !name.is_empty() && name != res.name() {
                    let msg = format!(
                        "no export named {name:?}; this socket exports {:?}",
                        res.name()
                    );
                    wr.write_all(&option_reply(option, REP_ERR_UNKNOWN, msg.as_bytes()))
                        .await?;
                    wr.flush().await?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&transmission_flags().to_be_bytes());
                wr.write_all(&option_reply(option, REP_INFO, &info)).await?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    b.extend_from_slice(&1u32.to_be_bytes());
                    b.extend_from_slice(&4096u32.to_be_bytes());
                    b.extend_from_slice(&MAX_REQUEST_BYTES.to_be_bytes());
                    wr.write_all(&option_reply(option, REP_INFO, &b)).await?;
                }
                wr.write_all(&option_reply(option, REP_ACK, &[])).await?;
                wr.flush().await?;
                if option == OPT_GO {
                    break;
                }
            }
            _ => {
                // Includes STRUCTURED_REPLY: we answer with simple replies only.
                wr.write_all(&option_reply(
                    option,
                    REP_ERR_UNSUP,
                    b"option not supported",
                ))
                .await?;
                wr.flush().await?;
            }
        }
    }
    transmission(rd, wr, res, budget).await
}

/// A reply on its way to the socket, holding the request's slot and buffer budget until
/// it is written: what a client has not read yet still counts against its limits.
struct Reply {
    bytes: Vec<u8>,
    _slot: OwnedSemaphorePermit,
    _memory: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

async fn transmission(
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: BufWriter<tokio::net::unix::OwnedWriteHalf>,
    res: Arc<Resource>,
    budget: Arc<Semaphore>,
) -> Result<(), ClientError> {
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(MAX_INFLIGHT_PER_CLIENT);
    let writer = tokio::spawn(reply_writer(wr, reply_rx));
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT_PER_CLIENT));
    let mine = Arc::new(Semaphore::new(CLIENT_BUDGET_BYTES / BUDGET_UNIT));
    let result = loop {
        let mut header = [0u8; 28];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match parse_request(&header) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        if reply_tx.is_closed() {
            break Err(ClientError::Protocol(format!(
                "the client read no reply for {} s: disconnected",
                REPLY_STALL.as_secs()
            )));
        }
        // A slot first (a client that does not read its replies runs out of slots and
        // is no longer read from, holding no buffer), then buffer space for the payload
        // (write data or read reply): the client's own share, then the export's.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let bytes = if matches!(req.kind, CMD_WRITE | CMD_READ) {
            req.length.min(MAX_REQUEST_BYTES)
        } else {
            0
        };
        let units = budget_units(bytes);
        let own = mine
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("semaphore never closed");
        let shared = budget
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("semaphore never closed");
        let data = if req.kind == CMD_WRITE {
            if req.length > MAX_REQUEST_BYTES {
                break Err(ClientError::Protocol(format!(
                    "WRITE of {} bytes exceeds the {MAX_REQUEST_BYTES}-byte maximum",
                    req.length
                )));
            }
            let mut d = vec![0u8; req.length as usize];
            if let Err(e) = rd.read_exact(&mut d).await {
                break Err(e.into());
            }
            Some(d)
        } else {
            None
        };
        let res = res.clone();
        let tx = reply_tx.clone();
        tokio::spawn(async move {
            let is_read = req.kind == CMD_READ;
            let bytes = execute(&res, req, data).await;
            // A write's data is on disk and its reply is 16 bytes: free its buffer now.
            let memory = is_read.then_some((own, shared));
            let _ = tx
                .send(Reply {
                    bytes,
                    _slot: slot,
                    _memory: memory,
                })
                .await;
        });
    };
    // Let in-flight requests finish and their replies go out before closing.
    drop(reply_tx);
    let _ = writer.await;
    result
}

/// Writes replies in order. A client that takes no reply for `REPLY_STALL` is dropped:
/// closing the queue frees every slot and buffer its replies held.
async fn reply_writer(
    mut wr: BufWriter<tokio::net::unix::OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Reply>,
) {
    while let Some(first) = rx.recv().await {
        if !in_time(wr.write_all(&first.bytes), "write").await {
            return;
        }
        drop(first);
        while let Ok(more) = rx.try_recv() {
            if !in_time(wr.write_all(&more.bytes), "write").await {
                return;
            }
        }
        if !in_time(wr.flush(), "flush").await {
            return;
        }
    }
}

/// One socket operation under the stall limit: false ends the connection (a stall is
/// logged; a socket error was the client leaving).
async fn in_time(op: impl std::future::Future<Output = std::io::Result<()>>, what: &str) -> bool {
    match tokio::time::timeout(REPLY_STALL, op).await {
        Ok(result) => result.is_ok(),
        Err(_) => {
            tracing::warn!(
                stall_s = REPLY_STALL.as_secs(),
                "NBD client takes no replies ({what}); disconnecting it"
            );
            false
        }
    }
}

fn errno(e: &IoError, write: bool) -> u32 {
    match e {
        IoError::NotPrimary => EPERM,
        IoError::NotUpToDate(_) => EIO,
        IoError::OutOfRange { .. } if write => ENOSPC,
        IoError::OutOfRange { .. } | IoError::TooLarge(_) => EINVAL,
        IoError::Down => ESHUTDOWN,
        IoError::NoQuorum | IoError::SourceLost => EIO,
        IoError::Disk(_) | IoError::Engine(_) => EIO,
    }
}

async fn execute(res: &Resource, req: Request, data: Option<Vec<u8>>) -> Vec<u8> {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let outcome: Result<Option<Vec<u8>>, (IoError, bool)> = match req.kind {
        CMD_READ => {
            if req.length > MAX_REQUEST_BYTES {
                Err((IoError::TooLarge(req.length as u64), false))
            } else {
                res.read(req.offset, req.length)
                    .await
                    .map(Some)
                    .map_err(|e| (e, false))
            }
        }
        CMD_WRITE => res
            .write(req.offset, data.unwrap_or_default(), fua)
            .await
            .map(|_| None)
            .map_err(|e| (e, true)),
        CMD_FLUSH => res.flush().await.map(|_| None).map_err(|e| (e, false)),
        CMD_TRIM | CMD_WRITE_ZEROES => res
            .write_zeroes(req.offset, req.length as u64, fua)
            .await
            .map(|_| None)
            .map_err(|e| (e, true)),
        other => {
            tracing::debug!(command = other, "unsupported NBD command");
            let mut r = simple_reply(EINVAL, req.handle).to_vec();
            r.shrink_to_fit();
            return r;
        }
    };
    match outcome {
        Ok(Some(payload)) => {
            let mut r = Vec::with_capacity(16 + payload.len());
            r.extend_from_slice(&simple_reply(0, req.handle));
            r.extend_from_slice(&payload);
            r
        }
        Ok(None) => simple_reply(0, req.handle).to_vec(),
        Err((e, write)) => {
            tracing::debug!(resource = %res.name(), error = %e, "NBD request failed");
            let code = errno(&e, write);
            if code == EPERM {
                tracing::warn!(resource = %res.name(), "refused a write: this node is Secondary (run `tandemadm primary {}`)", res.name());
            }
            simple_reply(code, req.handle).to_vec()
        }
    }
}
