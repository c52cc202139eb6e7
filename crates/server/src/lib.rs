//! The Cairn member: configuration with etcd's flags, the apply state machine
//! over mvcc, and etcd's gRPC services over consensus.

mod alarms;
mod apply;
mod auth;
mod auth_service;
mod backup;
pub mod cli;
mod client_tls;
mod cluster_service;
mod compactor;
pub mod config;
mod corruption;
mod election_service;
pub mod health_check;
mod http;
pub mod ids;
mod kv_service;
mod lease_service;
mod leases;
mod lock_service;
mod maintenance_service;
mod member;
mod metrics;
pub mod migrate;
mod proposal;
mod server;
mod validate;
mod watch_service;
