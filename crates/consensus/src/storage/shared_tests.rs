use std::sync::Barrier;

use raft::prelude::HardState;
use raft::{GetEntriesContext, Storage as _};

use super::*;
use crate::raft_log::RaftLog;
use crate::storage::LogStore;

fn entry(index: u64, term: u64, group: GroupId) -> Entry {
    Entry {
        index,
        term,
        data: format!("g{group}e{index}").into_bytes().into(),
        ..Default::default()
    }
}

fn hard_state(term: u64, commit: u64) -> HardState {
    HardState {
        term,
        commit,
        ..Default::default()
    }
}

/// (first, last) index and the data of every entry of `store`.
fn contents(store: &LogStore<GroupWriter>) -> (u64, u64, Vec<String>) {
    let (first, last) = (store.first_index(), store.last_index());
    let entries = store
        .entries(first, last + 1, None, GetEntriesContext::empty(false))
        .unwrap_or_default();
    let data = entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect();
    (first, last, data)
}

#[test]
fn groups_keep_their_own_entries_and_state_across_a_reopen() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    {
        let log = SharedRaftLog::open(dir.path())?;
        let mut a = LogStore::open_in(&log, 1)?;
        let mut b = LogStore::open_in(&log, 2)?;
        assert!(a.is_new() && b.is_new());
        assert!(LogStore::open_in(&log, 1).is_err(), "a group opens once");
        for i in 1..=5 {
            a.persist_ready(&[entry(i, 1, 1)], Some(&hard_state(1, i)), true)?;
            if i % 2 == 0 {
                b.persist_ready(&[entry(i / 2, 3, 2)], Some(&hard_state(3, i / 2)), true)?;
            }
        }
        // A new leader of group 1 rewrites its tail.
        a.persist_ready(&[entry(4, 2, 1)], Some(&hard_state(2, 3)), true)?;
        b.compact(1)?;
    }
    let log = SharedRaftLog::open(dir.path())?;
    let a = LogStore::open_in(&log, 1)?;
    let b = LogStore::open_in(&log, 2)?;
    assert_eq!(
        contents(&a),
        (
            1,
            4,
            vec!["g1e1", "g1e2", "g1e3", "g1e4"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    assert_eq!(a.term(4).ok(), Some(2));
    assert_eq!(a.hard_state().term, 2);
    assert_eq!(contents(&b), (2, 2, vec!["g2e2".to_string()]));
    assert_eq!(b.hard_state().term, 3);
    let mut c = LogStore::open_in(&log, 3)?;
    assert!(c.is_new(), "a group never written is new");
    c.bootstrap(&[])?;
    Ok(())
}

#[test]
fn segments_go_once_every_group_is_past_them() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let segments = |dir: &Path| -> usize {
        std::fs::read_dir(dir)
            .map(|d| d.filter(|e| e.is_ok()).count())
            .unwrap_or(0)
    };
    {
        let log = SharedRaftLog::open_with_segments_of(dir.path(), 512)?;
        let mut busy = LogStore::open_in(&log, 1)?;
        let mut idle = LogStore::open_in(&log, 2)?;
        idle.persist_ready(&[entry(1, 1, 2)], Some(&hard_state(1, 1)), true)?;
        for i in 1..=60 {
            busy.persist_ready(&[entry(i, 1, 1)], Some(&hard_state(1, i)), true)?;
        }
        let before = segments(dir.path());
        assert!(before > 3, "{before} segments");
        // The busy group compacts everything, but the idle one still needs
        // its entry in the first segment: nothing goes.
        busy.compact(60)?;
        assert_eq!(segments(dir.path()), before);
        // Once the idle group has compacted too, the old segments go.
        idle.compact(1)?;
        assert!(segments(dir.path()) < before, "old segments were deleted");
        busy.persist_ready(&[entry(61, 1, 1)], Some(&hard_state(1, 61)), true)?;
    }
    // What is left still holds both groups' state.
    let log = SharedRaftLog::open_with_segments_of(dir.path(), 512)?;
    let busy = LogStore::open_in(&log, 1)?;
    let idle = LogStore::open_in(&log, 2)?;
    assert_eq!((busy.first_index(), busy.last_index()), (61, 61));
    assert_eq!(busy.hard_state().commit, 61);
    assert_eq!((idle.first_index(), idle.last_index()), (2, 1));
    assert_eq!(idle.hard_state().term, 1);
    Ok(())
}

#[test]
fn a_snapshot_of_one_group_leaves_the_others_alone() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    {
        let log = SharedRaftLog::open_with_segments_of(dir.path(), 512)?;
        let mut a = LogStore::open_in(&log, 1)?;
        let mut b = LogStore::open_in(&log, 2)?;
        for i in 1..=20 {
            a.persist_ready(&[entry(i, 1, 1)], Some(&hard_state(1, i)), true)?;
            b.persist_ready(&[entry(i, 1, 2)], Some(&hard_state(1, i)), true)?;
        }
        let meta = raft::prelude::SnapshotMetadata {
            index: 100,
            term: 4,
            ..Default::default()
        };
        a.apply_snapshot(&meta, Vec::new())?;
        a.persist_ready(&[entry(101, 4, 1)], Some(&hard_state(4, 101)), true)?;
    }
    let log = SharedRaftLog::open_with_segments_of(dir.path(), 512)?;
    let a = LogStore::open_in(&log, 1)?;
    let b = LogStore::open_in(&log, 2)?;
    assert_eq!((a.first_index(), a.last_index()), (101, 101));
    assert_eq!((b.first_index(), b.last_index()), (1, 20));
    Ok(())
}

#[test]
fn groups_syncing_at_once_share_fsyncs() -> Result<(), Error> {
    const GROUPS: u64 = 8;
    const ROUNDS: u64 = 50;
    let dir = tempfile::tempdir()?;
    let log = SharedRaftLog::open(dir.path())?;
    let start = Barrier::new(GROUPS as usize);
    std::thread::scope(|scope| -> Result<(), Error> {
        let mut threads = Vec::new();
        for group in 1..=GROUPS {
            let (log, start) = (&log, &start);
            threads.push(scope.spawn(move || -> Result<(), Error> {
                let mut store = LogStore::open_in(log, group)?;
                start.wait();
                for i in 1..=ROUNDS {
                    store.persist_ready(&[entry(i, 1, group)], Some(&hard_state(1, i)), true)?;
                }
                Ok(())
            }));
        }
        for thread in threads {
            thread
                .join()
                .map_err(|_| Error::Corrupt("a writer panicked".into()))??;
        }
        Ok(())
    })?;
    let fsyncs = log.fsyncs()?;
    assert!(
        fsyncs < GROUPS * ROUNDS,
        "{fsyncs} fsyncs for {} synced commits",
        GROUPS * ROUNDS
    );
    drop(log);
    let log = SharedRaftLog::open(dir.path())?;
    for group in 1..=GROUPS {
        let store = LogStore::open_in(&log, group)?;
        assert_eq!(store.last_index(), ROUNDS, "group {group} kept every entry");
    }
    Ok(())
}

#[test]
fn a_log_of_one_group_is_not_taken_for_a_shared_one() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    {
        let mut store = LogStore::open(dir.path())?;
        store.bootstrap(&[])?;
        store.persist_ready(&[entry(1, 1, 0)], Some(&hard_state(1, 1)), true)?;
    }
    assert!(SharedRaftLog::open(&dir.path().join("wal")).is_err());
    Ok(())
}

/// What groups hand over goes to disk with the next flush of any group, in
/// one write and one fsync, and comes back to each group on reopen.
#[test]
fn one_flush_writes_and_syncs_what_every_group_handed_over() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    {
        let log = SharedRaftLog::open(dir.path())?;
        let mut groups = (1..=4)
            .map(|group| LogStore::open_in(&log, group))
            .collect::<Result<Vec<_>, _>>()?;
        let fsyncs = log.fsyncs()?;
        for (group, store) in (1..=4).zip(&mut groups) {
            store.append(&[entry(1, 1, group)], Some(&hard_state(1, 0)))?;
            store.hand_over()?;
        }
        groups[0].flush(true)?;
        assert_eq!(log.fsyncs()? - fsyncs, 1, "one fsync for four groups");
    }
    let log = SharedRaftLog::open(dir.path())?;
    for group in 1..=4 {
        let store = LogStore::open_in(&log, group)?;
        assert_eq!(contents(&store), (1, 1, vec![format!("g{group}e1")]));
        assert_eq!(store.hard_state().term, 1);
    }
    Ok(())
}
