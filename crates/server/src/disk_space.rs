//! A full disk, handled before it happens: the free space of the data dir's
//! filesystem is kept above a reserve. Below it, writes that grow the store
//! are refused with etcd's NOSPACE error and this member raises the NOSPACE
//! alarm through the log (as etcd does past its quota), so every member
//! refuses them; once space is back above twice the reserve, the member
//! clears the alarm it raised and takes writes again by itself.
//!
//! The reserve leaves room for what still comes after the alarm: writes
//! already in flight, the alarm entries themselves, the raft log's records,
//! and fjall's flushes and compactions. Should the disk fill anyway, the
//! applier refuses to start a batch it has no room for (fjall poisons a
//! database whose journal write fails), and consensus pauses and retries
//! both applying and writing its log rather than stop the member.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cairn_api::etcdserverpb::AlarmType;
use tokio::task::JoinHandle;

use crate::config::DiskReserve;
use crate::member::Member;

/// How often the monitor looks at the free space: the leader of a cluster
/// takes every member's writes into its log, so its own proposals are not
/// the only way its disk fills.
const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The automatic reserve: this share of the filesystem, within bounds.
const AUTO_RESERVE_PERCENT: u64 = 5;
const AUTO_RESERVE_MIN: u64 = 8 << 20;
const AUTO_RESERVE_MAX: u64 = 1 << 30;

/// The free space of one member's data dir.
pub struct DiskSpace {
    dir: PathBuf,
    /// Free bytes kept in reserve.
    reserve: u64,
    /// Whether this member raised NOSPACE for its disk, and so clears it
    /// when space comes back (a quota alarm waits for `alarm disarm`).
    raised_for_disk: AtomicBool,
}

impl DiskSpace {
    /// The watch on `dir`'s filesystem, with the reserve `setting` says;
    /// None when it is off.
    pub fn new(dir: PathBuf, setting: DiskReserve) -> io::Result<Option<DiskSpace>> {
        let reserve = match setting {
            DiskReserve::Off => return Ok(None),
            DiskReserve::Bytes(bytes) => bytes,
            DiskReserve::Auto => {
                let stat = rustix::fs::statvfs(&dir)?;
                let size = stat.f_blocks.saturating_mul(stat.f_frsize);
                (size / 100 * AUTO_RESERVE_PERCENT).clamp(AUTO_RESERVE_MIN, AUTO_RESERVE_MAX)
            }
        };
        tracing::info!(reserve, dir = %dir.display(), "keeping free space on the data dir's filesystem");
        Ok(Some(DiskSpace {
            dir,
            reserve,
            raised_for_disk: AtomicBool::new(false),
        }))
    }

    /// Bytes an unprivileged writer may still use.
    fn free_bytes(&self) -> io::Result<u64> {
        let stat = rustix::fs::statvfs(&self.dir)?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Whether the free space is below the reserve; a filesystem that
    /// cannot be asked counts as having room (the writes themselves will
    /// tell).
    pub fn below_reserve(&self) -> bool {
        match self.free_bytes() {
            Ok(free) => free < self.reserve,
            Err(e) => {
                tracing::warn!("could not read the data dir's free space: {e}");
                false
            }
        }
    }

    /// Ok when applying `bytes` of entries cannot fill the disk: twice
    /// their size (fjall's journal, then its tables) and a quarter of the
    /// reserve for the flushes and compactions running meanwhile. Else
    /// StorageFull, which has consensus wait and retry.
    pub fn room_to_apply(&self, bytes: u64) -> io::Result<()> {
        let needed = bytes.saturating_mul(2) + self.reserve / 4;
        let free = self.free_bytes()?;
        if free < needed {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("{free} bytes free on the data dir, {needed} needed to apply"),
            ));
        }
        Ok(())
    }

    /// Notes that this member raised NOSPACE because of its disk.
    pub fn note_raised(&self) {
        self.raised_for_disk.store(true, Ordering::SeqCst);
    }
}

/// Raises this member's NOSPACE alarm when its disk falls below the reserve
/// (whoever's writes filled it), and clears the alarm it raised once the
/// free space is back above twice the reserve (so that writes do not flap
/// at the edge).
pub fn spawn_monitor(member: Arc<Member>, disk: Arc<DiskSpace>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(CHECK_INTERVAL);
        loop {
            ticker.tick().await;
            // A learner proposes nothing; its log waits for room instead.
            if member.node.is_learner() {
                continue;
            }
            let free = match disk.free_bytes() {
                Ok(free) => free,
                Err(e) => {
                    tracing::warn!("could not read the data dir's free space: {e}");
                    continue;
                }
            };
            let raised = member.alarms().is_active_for(member.id, AlarmType::Nospace);
            if free < disk.reserve {
                if !raised {
                    tracing::warn!(
                        free,
                        reserve = disk.reserve,
                        "the data dir's disk is nearly full: refusing writes"
                    );
                    disk.note_raised();
                    member.raise_nospace().await;
                }
            } else if disk.raised_for_disk.load(Ordering::SeqCst) {
                if !raised {
                    // Disarmed by hand meanwhile.
                    disk.raised_for_disk.store(false, Ordering::SeqCst);
                } else if free >= disk.reserve.saturating_mul(2) {
                    tracing::info!(free, "the data dir has room again: taking writes");
                    if member.clear_nospace().await {
                        disk.raised_for_disk.store(false, Ordering::SeqCst);
                    }
                }
            }
        }
    })
}
