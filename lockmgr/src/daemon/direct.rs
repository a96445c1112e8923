//! Writing from the replica straight into a socket. Every Raft commit waits for an
//! append to reach a follower and its acknowledgement to come back, and then for the
//! client's answer to go out; handing each frame to an async task first cost a hop each
//! time (a thread hop while the replica had a thread of its own, a task switch since it
//! shares the daemon's only thread). So the replica writes frames into the connected
//! socket itself (non-blocking). Whatever the socket does not take at once waits in `pending`, which
//! the connection's task writes out in order when the socket drains; while anything is
//! pending, new frames queue behind it, so frames never interleave or reorder.
//!
//! `PeerOut` (Raft messages to one peer) drops frames it cannot send or queue: Raft
//! resends what matters. `ReplyOut` (answers to one client) queues from the start (the
//! connection's task publishes the socket a little later), reports a client that lets too
//! many replies pile up, and ends after a closing reply.

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

/// A connected socket the replica can write to.
pub trait Socket: Sync {
    fn raw_fd(&self) -> RawFd;
    fn writable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
}

impl Socket for TcpStream {
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn writable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        TcpStream::writable(self)
    }
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
}

impl Socket for tokio::net::unix::OwnedWriteHalf {
    fn raw_fd(&self) -> RawFd {
        self.as_ref().as_raw_fd()
    }
    fn writable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        tokio::net::unix::OwnedWriteHalf::writable(self)
    }
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write(self, buf)
    }
}

#[derive(Default)]
struct State {
    /// The connected socket, while a connection task owns it.
    fd: Option<RawFd>,
    pending: Vec<u8>,
    /// Stream positions where the frames (or frame tails) in `pending` end, oldest first,
    /// counted like `drained`: their number is how many frames wait.
    ends: std::collections::VecDeque<u64>,
    /// Bytes of `pending` written out so far, over the life of this queue.
    drained: u64,
    /// A closing frame was queued: nothing more is taken, the writer ends after it.
    closing: bool,
    /// The connection is over: nothing more is taken.
    gone: bool,
}

impl State {
    fn clear(&mut self) {
        self.drained += self.pending.len() as u64;
        self.pending.clear();
        self.ends.clear();
    }
}

/// What became of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Written or queued behind earlier frames.
    Taken,
    /// Too much waits already.
    Full,
    /// No connection to take it.
    Gone,
}

#[derive(Default)]
struct DirectOut {
    state: Mutex<State>,
    /// Tells the connection task that `pending` has bytes, or that it should stop.
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

/// Limits of one queue.
struct Limits {
    max_frames: usize,
    max_bytes: usize,
    /// Queue frames while no socket is published (else they are dropped as `Gone`).
    queue_unconnected: bool,
}

impl DirectOut {
    fn push(&self, bytes: &[u8], lim: &Limits, closing: bool) -> Push {
        let mut st = self.state.lock();
        if st.gone || st.closing {
            return Push::Gone;
        }
        if st.fd.is_none() && !lim.queue_unconnected {
            return Push::Gone;
        }
        let done = match (st.fd, st.pending.is_empty()) {
            // A write error is left to the task, which sees it on its own next write.
            (Some(fd), true) => write_now(fd, bytes).unwrap_or(0),
            _ => {
                let too_many = st.ends.len() >= lim.max_frames;
                let too_big = st.pending.len() + bytes.len() > lim.max_bytes;
                if !st.pending.is_empty() && (too_many || too_big) {
                    return Push::Full;
                }
                0
            }
        };
        st.closing = closing;
        let queued = done < bytes.len();
        if queued {
            st.pending.extend_from_slice(&bytes[done..]);
            let end = st.drained + st.pending.len() as u64;
            st.ends.push_back(end);
        }
        drop(st);
        // The task writes what waits, and stops after a closing frame.
        if queued || closing {
            self.wake.notify_one();
        }
        Push::Taken
    }

    /// No more frames; the writer writes what is pending and stops.
    fn finish(&self) {
        self.state.lock().gone = true;
        self.wake.notify_one();
    }

    /// Run by the connection's task: publishes the socket to the replica and
    /// writes out what it leaves pending, until the connection fails or (`until_done`)
    /// nothing more will come. The socket is withdrawn (under the lock) before this
    /// returns, so the caller may close it.
    async fn serve<S: Socket>(&self, s: &S, fresh: bool, until_done: bool) -> std::io::Result<()> {
        {
            let mut st = self.state.lock();
            if fresh {
                // What queued for an earlier connection is stale (Raft resends).
                st.clear();
            }
            st.fd = Some(s.raw_fd());
        }
        let res = self.pump(s, until_done).await;
        let mut st = self.state.lock();
        st.fd = None;
        if fresh {
            st.clear();
        } else {
            st.gone = true;
        }
        res
    }

    async fn pump<S: Socket>(&self, s: &S, until_done: bool) -> std::io::Result<()> {
        loop {
            // (The guard must not live across an await: the future would not be Send.)
            let (idle, done) = {
                let st = self.state.lock();
                (st.pending.is_empty(), until_done && (st.closing || st.gone))
            };
            if idle {
                if done {
                    return Ok(());
                }
                self.wake.notified().await;
                continue;
            }
            s.writable().await?;
            self.write_pending(s)?;
        }
    }

    /// Writes what the socket takes of `pending` now.
    fn write_pending<S: Socket>(&self, s: &S) -> std::io::Result<()> {
        let mut st = self.state.lock();
        let done = match s.try_write(&st.pending) {
            Ok(0) if !st.pending.is_empty() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the socket took no bytes",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        st.pending.drain(..done);
        st.drained += done as u64;
        let drained = st.drained;
        while st.ends.front().is_some_and(|&e| e <= drained) {
            st.ends.pop_front();
        }
        Ok(())
    }
}

/// The replica's way out to one peer.
#[derive(Default)]
pub struct PeerOut(DirectOut);

const PEER_LIMITS: Limits = Limits {
    max_frames: usize::MAX,
    max_bytes: MAX_PENDING_BYTES,
    queue_unconnected: false,
};

impl PeerOut {
    /// Sends a frame from the replica; never blocks. Dropped when the peer is not
    /// connected or too much already waits for it.
    pub fn send(&self, f: &PeerFrame) {
        if let Ok(bytes) = frame::encode(Channel::LockPeer, f) {
            let _ = self.0.push(&bytes, &PEER_LIMITS, false);
        }
    }

    /// Run by the connection's task until the connection fails (see `DirectOut::serve`).
    pub async fn serve(&self, stream: &TcpStream) -> std::io::Result<()> {
        self.0.serve(stream, true, false).await
    }
}

/// The replica's way out to one client connection.
#[derive(Default)]
pub struct ReplyOut(DirectOut);

impl ReplyOut {
    /// Queues or writes an encoded reply. `max_frames` replies may wait for a client
    /// that does not read.
    pub fn push(&self, bytes: &[u8], max_frames: usize, closing: bool) -> Push {
        let lim = Limits {
            max_frames,
            max_bytes: usize::MAX,
            queue_unconnected: true,
        };
        self.0.push(bytes, &lim, closing)
    }

    /// No more replies; the writer writes what is pending and stops.
    pub fn finish(&self) {
        self.0.finish()
    }

    /// Run by the connection's writer task: returns once a closing reply or `finish`
    /// has been written out, or the socket fails.
    pub async fn serve<S: Socket>(&self, s: &S) -> std::io::Result<()> {
        self.0.serve(s, false, true).await
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

    /// Takes at most `.0` bytes per write.
    struct Trickle(usize);
    impl Socket for Trickle {
        fn raw_fd(&self) -> RawFd {
            -1
        }
        fn writable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
            std::future::ready(Ok(()))
        }
        fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len().min(self.0))
        }
    }

    #[test]
    fn the_frame_limit_counts_frames_still_waiting_not_all_since_the_queue_was_empty() {
        let out = ReplyOut::default();
        for _ in 0..10 {
            assert_eq!(out.push(&[7; 10], 10, false), Push::Taken);
        }
        assert_eq!(out.push(&[7; 10], 10, false), Push::Full);
        // Two and a half frames go out: two places free up, the half-sent one still waits.
        out.0.write_pending(&Trickle(25)).unwrap();
        assert_eq!(out.push(&[7; 10], 10, false), Push::Taken);
        assert_eq!(out.push(&[7; 10], 10, false), Push::Taken);
        assert_eq!(out.push(&[7; 10], 10, false), Push::Full);
        // A client that keeps reading never hits the limit, however many frames pass.
        for _ in 0..1000 {
            out.0.write_pending(&Trickle(10)).unwrap();
            assert_eq!(out.push(&[7; 10], 10, false), Push::Taken);
        }
        assert_eq!(out.0.state.lock().ends.len(), 10);
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
        while out.0.state.lock().fd.is_none() {
            tokio::task::yield_now().await;
        }
        // Sent from another thread (the types stay thread-safe; the daemon itself now sends
        // from its only thread, where `pump` runs between the replica's turns); more than a socket buffer holds
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
            !out.0.state.lock().pending.is_empty(),
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
        assert!(out.0.state.lock().fd.is_none());
        out.send(&raft(5)); // no connection: dropped, no panic
        assert!(out.0.state.lock().pending.is_empty());
    }
}
