//! The grpc-proxy: forwards the client API to the members, coalesces watches
//! and lease keep-alives, and caches serializable reads, invalidated by an
//! upstream watch. Filled by the grpc-proxy issue.
