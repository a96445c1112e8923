//! A thread of the test process that lives in another process's mount namespace, so a
//! test can use plain `std::fs` on a node's private FUSE mount (`/var/www/html` of that
//! node) without spawning a shell per operation.
//!
//! A thread may enter another mount namespace only after it stops sharing filesystem
//! attributes with the rest of the process: `unshare(CLONE_FS)` first, then `setns`.

use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

pub struct NsWorker {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl NsWorker {
    /// A worker in the mount namespace of process `pid`.
    pub fn enter(pid: u32) -> anyhow::Result<Self> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            // SAFETY: affects only this thread's fs attributes and mount namespace.
            let r = unsafe {
                if libc::unshare(libc::CLONE_FS) != 0 {
                    Err(format!("unshare: {}", std::io::Error::last_os_error()))
                } else if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                    Err(format!("setns: {}", std::io::Error::last_os_error()))
                } else {
                    Ok(())
                }
            };
            let ok = r.is_ok();
            let _ = ready_tx.send(r);
            if ok {
                for job in rx {
                    job();
                }
            }
        });
        ready_rx
            .recv()?
            .map_err(|e| anyhow::anyhow!("entering the mount namespace of {pid}: {e}"))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs `f` in the namespace and returns its result; panics if it takes over two
    /// minutes (a hung mount), so the test fails and its cleanup unblocks the thread.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx
            .as_ref()
            .expect("worker alive")
            .send(job)
            .expect("worker thread alive");
        match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("a filesystem operation hung"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the job panicked"),
        }
    }
}

impl Drop for NsWorker {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
