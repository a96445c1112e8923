//! The replica thread's way out to one peer. Every Raft commit waits for an append to
//! reach a follower and its acknowledgement to come back, so the replica thread writes
//! frames straight into the connected socket (non-blocking) instead of handing each one
//! to an async task first: a thread hop fewer on both sides of every commit. Whatever the
//! socket does not take at once waits in `pending`, which the connection's task writes out
//! in order when the socket drains; while anything is pending, new frames queue behind it,
//! so frames never interleave or reorder.

use std::os::fd::{AsRawFd, RawFd};

use parking_lot::Mutex;
use tandem_common::frame::{self, Channel};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::peer::PeerFrame;

/// Bytes that may wait for a slow or absent peer before new frames are dropped (Raft
/// resends what matters). A single larger frame (a big snapshot) is still taken when
/// nothing else waits.
pub const MAX_PENDING_BYTES: usize = 64 << 20;

#[derive(Default)]
struct Out {
    /// The connected socket, while a connection task owns it.
    fd: Option<RawFd>,
    pending: Vec<u8>,
}

#[derive(Default)]
pub struct PeerOut {
    out: Mutex<Out>,
    /// Tells the connection task that `pending` has bytes.
    wake: Notify,
}

/// Writes as much of `buf` as the non-blocking socket takes now.
fn write_now(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: `fd` is open (the owning task clears it under the lock before closing)
        // and the pointer/length describe live memory.
        let n = unsafe {
            libc::send(
                fd,
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => break,
            _ => return Err(e),
        }
    }
    Ok(done)
}

impl PeerOut {
    /// Sends a frame from the replica thread; never blocks. Dropped when the peer is not
    /// connected or too much already waits for it.
    pub fn send(&self, f: &PeerFrame) {
        let Ok(bytes) = frame::encode(Channel::LockPeer, f) else {
            return;
        };
        let mut out = self.out.lock();
        let Some(fd) = out.fd else { return };
        if !out.pending.is_empty() {
            if out.pending.len() + bytes.len() > MAX_PENDING_BYTES {
                return;
            }
            out.pending.extend_from_slice(&bytes);
            return;
        }
        // A write error is left to the task, which sees it on its own next write.
        let done = write_now(fd, &bytes).unwrap_or(0);
        if done < bytes.len() {
            out.pending.extend_from_slice(&bytes[done..]);
            drop(out);
            self.wake.notify_one();
        }
    }

    /// Run by the connection's task: publishes the socket to the replica thread and
    /// writes out what it leaves pending, until the connection fails. The socket is
    /// withdrawn (under the lock) before this returns, so the caller may close it.
    pub async fn serve(&self, stream: &TcpStream) -> std::io::Result<()> {
        {
            let mut out = self.out.lock();
            // What queued for an earlier connection is stale (Raft resends).
            out.pending.clear();
            out.fd = Some(stream.as_raw_fd());
        }
        let res = self.pump(stream).await;
        let mut out = self.out.lock();
        out.fd = None;
        out.pending.clear();
        res
    }

    async fn pump(&self, stream: &TcpStream) -> std::io::Result<()> {
        loop {
            if self.out.lock().pending.is_empty() {
                self.wake.notified().await;
                continue;
            }
            stream.writable().await?;
            let mut out = self.out.lock();
            let done = match stream.try_write(&out.pending) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "peer socket took no bytes",
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            out.pending.drain(..done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Probe;

    fn raft(n: usize) -> PeerFrame {
        PeerFrame::Raft(vec![n as u8; n])
    }

    async fn read_frames(r: &mut tokio::net::TcpStream, count: usize) -> Vec<PeerFrame> {
        let mut got = Vec::new();
        for _ in 0..count {
            got.push(
                frame::read_msg(r, Channel::LockPeer, 1 << 30)
                    .await
                    .expect("frame"),
            );
        }
        got
    }

    #[tokio::test]
    async fn frames_arrive_whole_and_in_order_even_when_the_socket_fills() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (dial, acc) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (w, mut r) = (dial.unwrap(), acc.unwrap().0);
        let out = std::sync::Arc::new(PeerOut::default());
        let o2 = out.clone();
        let task = tokio::spawn(async move { o2.serve(&w).await });
        while out.out.lock().fd.is_none() {
            tokio::task::yield_now().await;
        }
        // Sent from another thread, as the replica does; more than a socket buffer holds
        // while nobody reads, so most of it waits in `pending`.
        let o3 = out.clone();
        let sizes: Vec<usize> = (0..300).map(|i| 1 + (i * 7919) % 60_000).collect();
        let s2 = sizes.clone();
        std::thread::spawn(move || {
            for (i, n) in s2.into_iter().enumerate() {
                if i % 50 == 0 {
                    o3.send(&PeerFrame::Probe(Probe::Ping(i as u64)));
                }
                o3.send(&raft(n));
            }
        })
        .join()
        .unwrap();
        assert!(
            !out.out.lock().pending.is_empty(),
            "the socket never filled"
        );
        let got = read_frames(&mut r, 300 + 6).await;
        let want: Vec<PeerFrame> = sizes
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| {
                let probe = (i % 50 == 0).then_some(PeerFrame::Probe(Probe::Ping(i as u64)));
                probe.into_iter().chain(std::iter::once(raft(n)))
            })
            .collect();
        assert!(got == want, "frames reordered or torn");
        drop(r);
        // The task notices the dead peer at its next write and withdraws the socket.
        out.send(&raft(100_000));
        let res = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                out.send(&raft(100_000));
                if task.is_finished() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            task.await.unwrap()
        })
        .await
        .expect("the task never saw the peer go");
        assert!(res.is_err());
        assert!(out.out.lock().fd.is_none());
        out.send(&raft(5)); // no connection: dropped, no panic
        assert!(out.out.lock().pending.is_empty());
    }
}
