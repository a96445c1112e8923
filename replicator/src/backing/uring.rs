//! io_uring engine: one submission thread per backing disk owns the ring. Requests arrive
//! on a channel; an eventfd, polled inside the ring itself, wakes the thread when new
//! requests are queued, so the thread only ever blocks in `submit_and_wait` and a new
//! request never waits behind an in-flight one.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

const RING_ENTRIES: u32 = 256;
const WAKE_TOKEN: u64 = u64::MAX;

enum Op {
    Read {
        offset: u64,
        buf: Vec<u8>,
        done_bytes: usize,
    },
    Write {
        offset: u64,
        buf: Vec<u8>,
        done_bytes: usize,
    },
    Sync,
}

enum Reply {
    Read(oneshot::Sender<std::io::Result<Vec<u8>>>),
    Unit(oneshot::Sender<std::io::Result<()>>),
}

struct Request {
    op: Op,
    reply: Reply,
}

pub struct UringEngine {
    tx: mpsc::Sender<Request>,
    eventfd: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct EventFd(i32);

impl EventFd {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall, no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd.
        unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }
    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; non-blocking fd.
        unsafe { libc::read(self.0, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own this fd.
        unsafe { libc::close(self.0) };
    }
}

impl UringEngine {
    pub fn new(file: Arc<File>) -> std::io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let eventfd = Arc::new(EventFd::new()?);
        let (tx, rx) = mpsc::channel();
        let efd = eventfd.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-uring".into())
            .spawn(move || run(ring, file, rx, efd))?;
        Ok(Self {
            tx,
            eventfd,
            thread: Some(thread),
        })
    }

    fn send(&self, op: Op, reply: Reply) -> bool {
        if self.tx.send(Request { op, reply }).is_err() {
            return false;
        }
        self.eventfd.wake();
        true
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        let op = Op::Read {
            offset,
            buf: vec![0u8; len],
            done_bytes: 0,
        };
        if !self.send(op, Reply::Read(tx)) {
            return Err(gone());
        }
        rx.await.map_err(|_| gone())?
    }

    pub async fn write_at(&self, offset: u64, data: Vec<u8>) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        let op = Op::Write {
            offset,
            buf: data,
            done_bytes: 0,
        };
        if !self.send(op, Reply::Unit(tx)) {
            return Err(gone());
        }
        rx.await.map_err(|_| gone())?
    }

    pub async fn sync(&self) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Op::Sync, Reply::Unit(tx)) {
            return Err(gone());
        }
        rx.await.map_err(|_| gone())?
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Closing the channel and waking the thread makes it finish in-flight work and exit.
        let (dead_tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, dead_tx));
        self.eventfd.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("io_uring thread has stopped")
}

fn sqe_for(op: &mut Op, fd: i32, token: u64) -> squeue::Entry {
    match op {
        Op::Read {
            offset,
            buf,
            done_bytes,
        } => {
            let rest = &mut buf[*done_bytes..];
            opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), rest.len() as u32)
                .offset(*offset + *done_bytes as u64)
                .build()
                .user_data(token)
        }
        Op::Write {
            offset,
            buf,
            done_bytes,
        } => {
            let rest = &buf[*done_bytes..];
            opcode::Write::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
                .offset(*offset + *done_bytes as u64)
                .build()
                .user_data(token)
        }
        Op::Sync => opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(token),
    }
}

fn finish(req: Request, result: std::io::Result<()>) {
    match (req.reply, req.op) {
        (Reply::Read(tx), Op::Read { buf, .. }) => {
            let _ = tx.send(result.map(|_| buf));
        }
        (Reply::Unit(tx), _) => {
            let _ = tx.send(result);
        }
        (Reply::Read(tx), _) => {
            let _ = tx.send(Err(std::io::Error::other("internal: reply/op mismatch")));
        }
    }
}

fn run(mut ring: IoUring, file: Arc<File>, rx: mpsc::Receiver<Request>, efd: Arc<EventFd>) {
    let fd = file.as_raw_fd();
    let mut slots: Vec<Option<Request>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut backlog: VecDeque<squeue::Entry> = VecDeque::new();
    let mut inflight = 0usize;
    let mut closed = false;
    let poll = |efd: &EventFd| {
        opcode::PollAdd::new(types::Fd(efd.0), libc::POLLIN as u32)
            .build()
            .user_data(WAKE_TOKEN)
    };
    backlog.push_back(poll(&efd));
    loop {
        // Take every queued request.
        loop {
            match rx.try_recv() {
                Ok(mut req) => {
                    let idx = free.pop().unwrap_or_else(|| {
                        slots.push(None);
                        slots.len() - 1
                    });
                    backlog.push_back(sqe_for(&mut req.op, fd, idx as u64));
                    slots[idx] = Some(req);
                    inflight += 1;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && inflight == 0 {
            return;
        }
        {
            let mut sq = ring.submission();
            while let Some(e) = backlog.front() {
                // SAFETY: every buffer an entry points at lives in `slots` until its
                // completion is reaped below.
                if unsafe { sq.push(e) }.is_err() {
                    break;
                }
                backlog.pop_front();
            }
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!(error = %e, "io_uring submit failed; failing all requests");
            for slot in slots.iter_mut() {
                if let Some(req) = slot.take() {
                    finish(
                        req,
                        Err(std::io::Error::other(format!("io_uring failed: {e}"))),
                    );
                }
            }
            // Serve later requests with an error too until the engine is dropped.
            while let Ok(req) = rx.recv() {
                finish(req, Err(std::io::Error::other("io_uring failed earlier")));
            }
            return;
        }
        let completions: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in completions {
            if token == WAKE_TOKEN {
                efd.drain();
                backlog.push_back(poll(&efd));
                continue;
            }
            let idx = token as usize;
            let Some(mut req) = slots[idx].take() else {
                continue;
            };
            if res < 0 {
                let err = std::io::Error::from_raw_os_error(-res);
                if err.kind() == std::io::ErrorKind::Interrupted {
                    backlog.push_back(sqe_for(&mut req.op, fd, token));
                    slots[idx] = Some(req);
                    continue;
                }
                finish(req, Err(err));
            } else {
                let n = res as usize;
                let partial = match &mut req.op {
                    Op::Read {
                        buf, done_bytes, ..
                    }
                    | Op::Write {
                        buf, done_bytes, ..
                    } => {
                        if n == 0 {
                            Some(Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "short transfer at end of disk",
                            )))
                        } else {
                            *done_bytes += n;
                            (*done_bytes < buf.len()).then_some(Ok(()))
                        }
                    }
                    Op::Sync => None,
                };
                match partial {
                    Some(Ok(())) => {
                        backlog.push_back(sqe_for(&mut req.op, fd, token));
                        slots[idx] = Some(req);
                        continue;
                    }
                    Some(Err(e)) => finish(req, Err(e)),
                    None => finish(req, Ok(())),
                }
            }
            free.push(idx);
            inflight -= 1;
        }
    }
}
