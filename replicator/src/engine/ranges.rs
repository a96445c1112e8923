//! Byte-range locks inside one resource. A write holds its range from before the local
//! write until its message is queued to every peer; a resync chunk holds its range from
//! the read until its data is queued. So a resync never sends data older than a write
//! that was already queued to the same peer (the stream is ordered), and two concurrent
//! overlapping writes are serialised (and counted: a dual-primary conflict means the
//! filesystem above failed to lock).

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: AtomicU64,
    released: Notify,
    /// Number of times a request had to wait for an overlapping one.
    pub waits: AtomicU64,
}

pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    id: u64,
}

impl RangeLocks {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Waits until `[start, start+len)` overlaps no held range, then holds it.
    pub async fn lock(self: &Arc<Self>, start: u64, len: u64) -> RangeGuard {
        let end = start.saturating_add(len.max(1));
        let mut waited = false;
        loop {
            let notified = self.released.notified();
            {
                let mut held = self.held.lock();
                if !held.iter().any(|&(_, s, e)| s < end && start < e) {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    held.push((id, start, end));
                    return RangeGuard {
                        locks: self.clone(),
                        id,
                    };
                }
            }
            if !waited {
                waited = true;
                self.waits.fetch_add(1, Ordering::Relaxed);
            }
            notified.await;
        }
    }
}

impl RangeLocks {
    /// Records a range without waiting (the in-flight registry used for conflict
    /// detection): held until the guard drops.
    pub fn register(self: &Arc<Self>, start: u64, len: u64) -> RangeGuard {
        let end = start.saturating_add(len.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.held.lock().push((id, start, end));
        RangeGuard {
            locks: self.clone(),
            id,
        }
    }

    /// Whether any held range overlaps `[start, start+len)`.
    pub fn overlaps(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len.max(1));
        self.held
            .lock()
            .iter()
            .any(|&(_, s, e)| s < end && start < e)
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.locks.held.lock().retain(|&(id, _, _)| id != self.id);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let l = RangeLocks::new();
        let g = l.lock(0, 4096).await;
        let _d = l.lock(4096, 4096).await; // disjoint: immediate
        let l2 = l.clone();
        let t = tokio::spawn(async move {
            let _g = l2.lock(100, 10).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!t.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.waits.load(Ordering::Relaxed), 1);
    }
}
