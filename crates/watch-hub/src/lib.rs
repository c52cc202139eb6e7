//! The watch hub: a registry of watchers, fed the events of each revision by
//! the apply loop when caught up, and by a catch-up task reading mvcc when
//! they start in the past or fall behind. Filled by the watch-and-leases issue.
