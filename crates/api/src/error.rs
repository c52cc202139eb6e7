//! etcd's client-visible server errors (etcd 3.4, package
//! `etcdserver/api/v3rpc/rpctypes`): each one a gRPC code and an exact
//! message. etcd clients recognise these errors by their message text, so
//! the strings must match byte for byte.
//!
//! ```
//! use cairn_api::error::{self, EtcdError};
//!
//! let status: tonic::Status = error::EMPTY_KEY.into();
//! assert_eq!(status.code(), tonic::Code::InvalidArgument);
//! assert_eq!(status.message(), "etcdserver: key is not provided");
//! assert_eq!(EtcdError::from_message(status.message()), Some(error::EMPTY_KEY));
//! ```

use std::fmt;

use tonic::{Code, Status};

/// One of etcd's server errors: the gRPC code and the exact message etcd
/// sends with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EtcdError {
    code: Code,
    message: &'static str,
}

impl EtcdError {
    /// An error with the given code and message.
    pub const fn new(code: Code, message: &'static str) -> Self {
        Self { code, message }
    }

    /// The gRPC status code etcd answers with.
    pub const fn code(&self) -> Code {
        self.code
    }

    /// The exact message etcd answers with.
    pub const fn message(&self) -> &'static str {
        self.message
    }

    /// The gRPC status to answer a call with.
    pub fn status(&self) -> Status {
        Status::new(self.code, self.message)
    }

    /// The known error whose message is exactly `message`, as an etcd client
    /// maps a status it receives back to an error value.
    pub fn from_message(message: &str) -> Option<EtcdError> {
        ALL.iter().copied().find(|e| e.message == message)
    }

    /// The known error matching a received status (code and message).
    pub fn from_status(status: &Status) -> Option<EtcdError> {
        Self::from_message(status.message()).filter(|e| e.code == status.code())
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message)
    }
}

impl std::error::Error for EtcdError {}

/// An error with its causes, `outer: inner: innermost`, as operators read
/// a failure in the log (the text anyhow's `{:#}` gives).
pub fn report(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Self {
        e.status()
    }
}

// Requests and the key-value store.

/// A request gave no key.
pub const EMPTY_KEY: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: key is not provided");
/// A put with `ignore_value` or `ignore_lease` named a key that does not exist.
pub const KEY_NOT_FOUND: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: key not found");
/// A put gave a value together with `ignore_value`.
pub const VALUE_PROVIDED: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: value is provided");
/// A put gave a lease together with `ignore_lease`.
pub const LEASE_PROVIDED: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: lease is provided");
/// A txn has more operations than the server allows (`--max-txn-ops`).
pub const TOO_MANY_OPS: EtcdError = EtcdError::new(
    Code::InvalidArgument,
    "etcdserver: too many operations in txn request",
);
/// A txn writes the same key twice in one branch.
pub const DUPLICATE_KEY: EtcdError = EtcdError::new(
    Code::InvalidArgument,
    "etcdserver: duplicate key given in txn request",
);
/// The requested revision has been compacted away.
pub const COMPACTED: EtcdError = EtcdError::new(
    Code::OutOfRange,
    "etcdserver: mvcc: required revision has been compacted",
);
/// The requested revision is beyond the current one.
pub const FUTURE_REV: EtcdError = EtcdError::new(
    Code::OutOfRange,
    "etcdserver: mvcc: required revision is a future revision",
);
/// The backend's space quota is exhausted (NOSPACE alarm raised).
pub const NO_SPACE: EtcdError = EtcdError::new(
    Code::ResourceExhausted,
    "etcdserver: mvcc: database space exceeded",
);

// Leases.

/// No lease has the given id.
pub const LEASE_NOT_FOUND: EtcdError =
    EtcdError::new(Code::NotFound, "etcdserver: requested lease not found");
/// A grant asked for an id that is already in use.
pub const LEASE_EXIST: EtcdError =
    EtcdError::new(Code::FailedPrecondition, "etcdserver: lease already exists");
/// A grant asked for a TTL above the maximum.
pub const LEASE_TTL_TOO_LARGE: EtcdError =
    EtcdError::new(Code::OutOfRange, "etcdserver: too large lease TTL");

// Watch (later 3.4 patch releases).

/// The watch stream was cancelled.
pub const WATCH_CANCELED: EtcdError = EtcdError::new(Code::Cancelled, "etcdserver: watch canceled");

// Membership.

/// A member with that id already exists.
pub const MEMBER_EXIST: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: member ID already exist",
);
/// Another member already uses one of the peer URLs.
pub const PEER_URL_EXIST: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: Peer URLs already exists",
);
/// The change would leave too few started members for quorum.
pub const MEMBER_NOT_ENOUGH_STARTED: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: re-configuration failed due to not enough started members",
);
/// The peer URLs given are not valid URLs.
pub const MEMBER_BAD_URLS: EtcdError = EtcdError::new(
    Code::InvalidArgument,
    "etcdserver: given member URLs are invalid",
);
/// No member has the given id.
pub const MEMBER_NOT_FOUND: EtcdError =
    EtcdError::new(Code::NotFound, "etcdserver: member not found");
/// Promote named a member that is not a learner.
pub const MEMBER_NOT_LEARNER: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: can only promote a learner member",
);
/// Promote named a learner that has not caught up with the leader.
pub const LEARNER_NOT_READY: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: can only promote a learner member which is in sync with leader",
);
/// Adding the learner would exceed the learner limit.
pub const TOO_MANY_LEARNERS: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: too many learner members in cluster",
);

// Request limits.

/// The request is larger than the server accepts (`--max-request-bytes`).
pub const REQUEST_TOO_LARGE: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: request is too large");
/// Too many proposals are waiting to be applied.
pub const TOO_MANY_REQUESTS: EtcdError =
    EtcdError::new(Code::ResourceExhausted, "etcdserver: too many requests");

// Authentication and authorisation.

/// Auth enable without a `root` user.
pub const ROOT_USER_NOT_EXIST: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: root user does not exist",
);
/// Auth enable with a `root` user that lacks the `root` role.
pub const ROOT_ROLE_NOT_EXIST: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: root user does not have root role",
);
/// User add with a name already taken.
pub const USER_ALREADY_EXIST: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: user name already exists",
);
/// User add with an empty name.
pub const USER_EMPTY: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: user name is empty");
/// No user has the given name.
pub const USER_NOT_FOUND: EtcdError =
    EtcdError::new(Code::FailedPrecondition, "etcdserver: user name not found");
/// Role add with a name already taken.
pub const ROLE_ALREADY_EXIST: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: role name already exists",
);
/// No role has the given name.
pub const ROLE_NOT_FOUND: EtcdError =
    EtcdError::new(Code::FailedPrecondition, "etcdserver: role name not found");
/// Role add with an empty name.
pub const ROLE_EMPTY: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: role name is empty");
/// Wrong user name or password.
pub const AUTH_FAILED: EtcdError = EtcdError::new(
    Code::InvalidArgument,
    "etcdserver: authentication failed, invalid user ID or password",
);
/// The caller's roles do not allow the operation.
pub const PERMISSION_DENIED: EtcdError =
    EtcdError::new(Code::PermissionDenied, "etcdserver: permission denied");
/// Revoke of a role the user does not have.
pub const ROLE_NOT_GRANTED: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: role is not granted to the user",
);
/// Revoke of a permission the role does not have.
pub const PERMISSION_NOT_GRANTED: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: permission is not granted to the role",
);
/// Role grant-permission without a permission.
pub const PERMISSION_NOT_GIVEN: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: permission not given");
/// Authenticate while authentication is disabled.
pub const AUTH_NOT_ENABLED: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: authentication is not enabled",
);
/// The token is unknown or has expired.
pub const INVALID_AUTH_TOKEN: EtcdError =
    EtcdError::new(Code::Unauthenticated, "etcdserver: invalid auth token");
/// A change that would break auth management (e.g. revoking `root` from the
/// root user while auth is enabled).
pub const INVALID_AUTH_MGMT: EtcdError =
    EtcdError::new(Code::InvalidArgument, "etcdserver: invalid auth management");
/// The auth store changed after the request's token was checked (later 3.4
/// patch releases).
pub const AUTH_OLD_REVISION: EtcdError = EtcdError::new(
    Code::InvalidArgument,
    "etcdserver: revision of auth store is old",
);

// Consensus and server state.

/// The member knows of no leader.
pub const NO_LEADER: EtcdError = EtcdError::new(Code::Unavailable, "etcdserver: no leader");
/// The operation must run on the leader and this member is not it.
pub const NOT_LEADER: EtcdError =
    EtcdError::new(Code::FailedPrecondition, "etcdserver: not leader");
/// Leadership changed while the request was in flight.
pub const LEADER_CHANGED: EtcdError =
    EtcdError::new(Code::Unavailable, "etcdserver: leader changed");
/// The cluster version does not support the request yet.
pub const NOT_CAPABLE: EtcdError = EtcdError::new(Code::Unavailable, "etcdserver: not capable");
/// The server is shutting down.
pub const STOPPED: EtcdError = EtcdError::new(Code::Unavailable, "etcdserver: server stopped");
/// The proposal was not applied in time.
pub const TIMEOUT: EtcdError = EtcdError::new(Code::Unavailable, "etcdserver: request timed out");
/// Timed out, probably because the previous leader failed.
pub const TIMEOUT_DUE_TO_LEADER_FAIL: EtcdError = EtcdError::new(
    Code::Unavailable,
    "etcdserver: request timed out, possibly due to previous leader failure",
);
/// Timed out, probably because the connection to peers was lost.
pub const TIMEOUT_DUE_TO_CONNECTION_LOST: EtcdError = EtcdError::new(
    Code::Unavailable,
    "etcdserver: request timed out, possibly due to connection lost",
);
/// Timed out waiting for the applied index to catch up (later 3.4 patch
/// releases).
pub const TIMEOUT_WAIT_APPLIED_INDEX: EtcdError = EtcdError::new(
    Code::Unavailable,
    "etcdserver: request timed out, waiting for the applied index took too long",
);
/// The change would make the cluster lose quorum.
pub const UNHEALTHY: EtcdError = EtcdError::new(Code::Unavailable, "etcdserver: unhealthy cluster");
/// A CORRUPT alarm is raised.
pub const CORRUPT: EtcdError = EtcdError::new(Code::DataLoss, "etcdserver: corrupt cluster");
/// A learner was asked for something only voting members serve.
pub const NOT_SUPPORTED_FOR_LEARNER: EtcdError = EtcdError::new(
    Code::Unavailable,
    "etcdserver: rpc not supported for learner",
);
/// Move-leader named a member that cannot take leadership.
pub const BAD_LEADER_TRANSFEREE: EtcdError = EtcdError::new(
    Code::FailedPrecondition,
    "etcdserver: bad leader transferee",
);

// Errors of later etcd versions, kept for clients that know them.

/// etcd 3.5+: the cluster version is not known during a downgrade.
pub const CLUSTER_VERSION_UNAVAILABLE: EtcdError = EtcdError::new(
    Code::Unavailable,
    "etcdserver: cluster version not found during downgrade",
);
/// etcd 3.5+: the request's cluster id is not this cluster's.
pub const CLUSTER_ID_MISMATCH: EtcdError =
    EtcdError::new(Code::FailedPrecondition, "etcdserver: cluster ID mismatch");

/// Every error above, for lookups by message.
pub const ALL: &[EtcdError] = &[
    EMPTY_KEY,
    KEY_NOT_FOUND,
    VALUE_PROVIDED,
    LEASE_PROVIDED,
    TOO_MANY_OPS,
    DUPLICATE_KEY,
    COMPACTED,
    FUTURE_REV,
    NO_SPACE,
    LEASE_NOT_FOUND,
    LEASE_EXIST,
    LEASE_TTL_TOO_LARGE,
    WATCH_CANCELED,
    MEMBER_EXIST,
    PEER_URL_EXIST,
    MEMBER_NOT_ENOUGH_STARTED,
    MEMBER_BAD_URLS,
    MEMBER_NOT_FOUND,
    MEMBER_NOT_LEARNER,
    LEARNER_NOT_READY,
    TOO_MANY_LEARNERS,
    REQUEST_TOO_LARGE,
    TOO_MANY_REQUESTS,
    ROOT_USER_NOT_EXIST,
    ROOT_ROLE_NOT_EXIST,
    USER_ALREADY_EXIST,
    USER_EMPTY,
    USER_NOT_FOUND,
    ROLE_ALREADY_EXIST,
    ROLE_NOT_FOUND,
    ROLE_EMPTY,
    AUTH_FAILED,
    PERMISSION_DENIED,
    ROLE_NOT_GRANTED,
    PERMISSION_NOT_GRANTED,
    PERMISSION_NOT_GIVEN,
    AUTH_NOT_ENABLED,
    INVALID_AUTH_TOKEN,
    INVALID_AUTH_MGMT,
    AUTH_OLD_REVISION,
    NO_LEADER,
    NOT_LEADER,
    LEADER_CHANGED,
    NOT_CAPABLE,
    STOPPED,
    TIMEOUT,
    TIMEOUT_DUE_TO_LEADER_FAIL,
    TIMEOUT_DUE_TO_CONNECTION_LOST,
    TIMEOUT_WAIT_APPLIED_INDEX,
    UNHEALTHY,
    CORRUPT,
    NOT_SUPPORTED_FOR_LEARNER,
    BAD_LEADER_TRANSFEREE,
    CLUSTER_VERSION_UNAVAILABLE,
    CLUSTER_ID_MISMATCH,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_messages_and_codes() {
        let cases = [
            (
                EMPTY_KEY,
                Code::InvalidArgument,
                "etcdserver: key is not provided",
            ),
            (
                COMPACTED,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                NO_SPACE,
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (
                LEASE_NOT_FOUND,
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                PEER_URL_EXIST,
                Code::FailedPrecondition,
                "etcdserver: Peer URLs already exists",
            ),
            (
                INVALID_AUTH_TOKEN,
                Code::Unauthenticated,
                "etcdserver: invalid auth token",
            ),
            (
                PERMISSION_DENIED,
                Code::PermissionDenied,
                "etcdserver: permission denied",
            ),
            (
                NOT_LEADER,
                Code::FailedPrecondition,
                "etcdserver: not leader",
            ),
            (STOPPED, Code::Unavailable, "etcdserver: server stopped"),
            (CORRUPT, Code::DataLoss, "etcdserver: corrupt cluster"),
        ];
        for (err, code, message) in cases {
            assert_eq!(err.code(), code, "{message}");
            assert_eq!(err.message(), message);
            assert_eq!(err.to_string(), message);
            let status: Status = err.into();
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
            assert_eq!(err.status().message(), message);
        }
    }

    #[test]
    fn messages_are_unique_and_prefixed() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(a.message().starts_with("etcdserver: "), "{a}");
            for b in &ALL[i + 1..] {
                assert_ne!(a.message(), b.message());
            }
        }
    }

    #[test]
    fn lookup_by_message_and_status() {
        for err in ALL {
            assert_eq!(EtcdError::from_message(err.message()), Some(*err));
            assert_eq!(EtcdError::from_status(&err.status()), Some(*err));
        }
        assert_eq!(EtcdError::from_message("etcdserver: no such error"), None);
        let wrong_code = Status::new(Code::Internal, EMPTY_KEY.message());
        assert_eq!(EtcdError::from_status(&wrong_code), None);
    }
}
