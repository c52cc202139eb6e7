//! The HTTP gateway: etcd's `/v3` JSON API in grpc-gateway's encoding, the v2
//! keys API emulated on the v3 store, `/health`, `/version` and Prometheus
//! `/metrics`. Filled by the gateway issue.
