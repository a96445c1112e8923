//! Replaying another node's journal (GFS2's journal recovery).
//!
//! A mount that dies — process killed, node lost — leaves its `journal/N` and `meta` locks
//! as orphans (they are PERSISTENT), so every other node's requests for `meta` wait. A
//! survivor's recovery thread sees the orphaned journal lock, takes it with RECOVERY
//! (granted once the lock manager knows the owner cannot come back: its process is gone
//! or its node is fenced), takes `meta` EX with RECOVERY (the survivors' own cached
//! `meta` locks are called back and flushed first), replays the journal, marks it clean
//! and reports `recovery-done`, which purges the orphans and lets the waiters go.

use tandem_lockmgr::types::{Flags, Mode};

use super::lockd::{would_block, LockdConn};
use super::{journal_lock, META_LOCK};
use crate::block::BlockDevice;
use crate::error::{FsError, Result};
use crate::format::Superblock;
use crate::journal::Journal;

fn lock_err(e: impl std::fmt::Display) -> FsError {
    FsError::Lock(e.to_string())
}

/// Looks for orphaned journal locks and recovers each journal it can take; returns how
/// many it recovered.
pub fn scan(conn: &LockdConn, dev: &dyn BlockDevice, sb: &Superblock, mine: u32) -> Result<usize> {
    let resources = conn.locks().map_err(lock_err)?;
    let mut recovered = 0;
    for r in resources {
        let Some(j) = std::str::from_utf8(&r.name)
            .ok()
            .and_then(|n| n.strip_prefix("journal/"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if j == mine || j >= sb.journal_count {
            continue;
        }
        if let Some(orphan) = r.granted.iter().find(|l| l.orphaned) {
            if recover(conn, dev, sb, j, orphan.owner.node)? {
                recovered += 1;
            }
        }
    }
    Ok(recovered)
}

fn recover(
    conn: &LockdConn,
    dev: &dyn BlockDevice,
    sb: &Superblock,
    j: u32,
    owner: tandem_common::NodeId,
) -> Result<bool> {
    let jl = match conn.lock(&journal_lock(j), Mode::EX, Flags::RECOVERY | Flags::NOQUEUE) {
        Ok(g) => g.lock,
        // Not fenced yet, or another survivor is recovering it.
        Err(e) if would_block(&e) => return Ok(false),
        Err(e) => return Err(lock_err(e)),
    };
    tracing::warn!(journal = j, node = %owner, "recovering the journal of a failed mount");
    let t0 = std::time::Instant::now();
    let res = replay_under_meta(conn, dev, sb, j);
    let res = res.and_then(|stats| {
        conn.recovery_done(owner).map_err(lock_err)?;
        Ok(stats)
    });
    let _ = conn.unlock(jl);
    let (transactions, blocks) = res?;
    tracing::warn!(
        journal = j,
        node = %owner,
        transactions,
        blocks,
        ms = t0.elapsed().as_millis() as u64,
        "journal recovered; recovery-done sent"
    );
    Ok(true)
}

/// Takes `meta` EX|RECOVERY, replays journal `j` if it is dirty and marks it clean.
fn replay_under_meta(
    conn: &LockdConn,
    dev: &dyn BlockDevice,
    sb: &Superblock,
    j: u32,
) -> Result<(u64, u64)> {
    if Journal::read_header(dev, sb, j).is_ok_and(|h| h.clean) {
        return Ok((0, 0));
    }
    let meta = conn
        .lock(META_LOCK, Mode::EX, Flags::RECOVERY)
        .map_err(lock_err)?
        .lock;
    let res = Journal::recover(dev, sb, j);
    let _ = conn.unlock(meta);
    res.map(|s| (s.transactions, s.blocks))
}

/// At mount (caller holds `meta` EX): replays dirty journals nobody holds or orphaned.
pub fn unowned(conn: &LockdConn, dev: &dyn BlockDevice, sb: &Superblock, mine: u32) -> Result<()> {
    for j in 0..sb.journal_count {
        if j == mine || Journal::read_header(dev, sb, j).is_ok_and(|h| h.clean) {
            continue;
        }
        let jl = match conn.lock(&journal_lock(j), Mode::EX, Flags::NOQUEUE) {
            Ok(g) => g.lock,
            Err(e) if would_block(&e) => continue,
            Err(e) => return Err(lock_err(e)),
        };
        let res = Journal::recover(dev, sb, j);
        let _ = conn.unlock(jl);
        let stats = res?;
        tracing::warn!(
            journal = j,
            transactions = stats.transactions,
            "replayed a dirty journal no mount owned"
        );
    }
    Ok(())
}
