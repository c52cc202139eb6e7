//! The lessor: lease grant, revoke, keep-alive renewal, expiry decided by the
//! leader and proposed through consensus, and TTL checkpoints that survive a
//! leader change. Filled by the watch-and-leases issue; until then the member
//! stores the lease ID given with a put without checking it.
