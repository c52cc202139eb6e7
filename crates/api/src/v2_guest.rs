//! The v2 API's caller without credentials: a plain marker the gateway
//! puts on its in-process gRPC calls and the member's auth reads, so neither
//! depends on the other.

/// Marks a request the v2 API makes for a caller without credentials: the
/// member's auth lets it do what etcd v2's `guest` role grants (v3 has no
/// guest).
#[derive(Clone, Copy, Debug)]
pub struct V2Guest;

/// The caller a [`V2Guest`] request is checked as, in the log's request
/// headers: not a name a v3 user can be created with (v3 names are given as
/// strings and cannot start with NUL through etcdctl), holding the v2
/// `guest` role.
pub const V2_GUEST_USER: &str = "\0v2-guest";
/// etcd v2's role for callers without credentials.
pub const V2_GUEST_ROLE: &str = "guest";
