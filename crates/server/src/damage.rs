//! What a member does when its store turns out damaged while it runs (a
//! block of fjall's tables failing its checksum on a read, an apply, a
//! watch catching up, a hash or a snapshot): it stops, non-zero, rather
//! than go on refusing some reads with errors etcd's clients do not fail
//! over on. Its clients move to the other members; it leaves a marker in
//! its member directory so that it does not start again on that data, even
//! where its start would not read the damaged blocks. The repair is to
//! remove the member and add it again on an empty data directory; it then
//! catches up from the others.

use std::path::{Path, PathBuf};

/// Left in the member directory by a member that stopped on damage.
const MARKER: &str = "store-damaged";

/// What to do about a damaged store, after what was found.
fn advice(member_id: u64, damage: &str) -> String {
    format!(
        "the member's store is damaged ({damage}); some keys can no longer be read right, so the \
         member stops and will not start again on this data. Remove it from the cluster \
         (etcdctl member remove {member_id:x}), delete its data directory and add it again \
         (etcdctl member add); it catches up from the other members"
    )
}

fn marker(member_dir: &Path) -> PathBuf {
    member_dir.join(MARKER)
}

/// Refuses to start a member that stopped on its damaged store before.
pub fn check_start(member_dir: &Path, member_id: u64) -> Result<(), String> {
    match std::fs::read_to_string(marker(member_dir)) {
        Ok(damage) => Err(advice(member_id, damage.trim())),
        Err(_) => Ok(()),
    }
}

/// Waits for the first damage a store of this process finds; then leaves
/// the marker and returns why the member stops.
pub async fn found(member_dir: &Path, member_id: u64) -> String {
    let mut damage = cairn_mvcc::damage_found();
    // The borrow ends here: `run`'s future must stay Send.
    let found = match damage.wait_for(Option::is_some).await {
        Ok(found) => Some(found.as_deref().unwrap_or_default().to_string()),
        Err(_) => None,
    };
    match found {
        Some(damage) => stopping_on(member_dir, member_id, &damage),
        // The sender lives as long as the process.
        None => std::future::pending().await,
    }
}

/// The damage found so far, if any, as the reason to stop: an apply that
/// met it stops raft before [`found`] hears of it.
pub fn found_already(member_dir: &Path, member_id: u64) -> Option<String> {
    let damage = cairn_mvcc::damage_found().borrow().as_deref()?.to_string();
    Some(stopping_on(member_dir, member_id, &damage))
}

/// Writes the marker and syncs it and its name: after a power loss the
/// member must still refuse the damaged store.
fn leave_marker(member_dir: &Path, damage: &str) -> std::io::Result<()> {
    let mut file = std::fs::File::create(marker(member_dir))?;
    std::io::Write::write_all(&mut file, damage.as_bytes())?;
    file.sync_all()?;
    std::fs::File::open(member_dir)?.sync_all()
}

fn stopping_on(member_dir: &Path, member_id: u64, damage: &str) -> String {
    let reason = advice(member_id, damage);
    tracing::error!("{reason}");
    if let Err(e) = leave_marker(member_dir, damage) {
        tracing::warn!(error = %e, "could not leave the damaged-store marker; a restart may read the damaged store again");
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_member_is_refused_with_the_way_back() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        assert!(check_start(dir.path(), 0xa1).is_ok());
        let reason = stopping_on(dir.path(), 0xa1, "mvcc store damaged: ChecksumMismatch");
        assert!(reason.contains("etcdctl member remove a1"), "{reason}");
        let refused = check_start(dir.path(), 0xa1).err().ok_or("started")?;
        assert!(
            refused.contains("(mvcc store damaged: ChecksumMismatch)")
                && refused.contains("member add"),
            "{refused}"
        );
        Ok(())
    }
}
