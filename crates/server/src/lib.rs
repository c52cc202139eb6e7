//! The Cairn member: configuration with etcd's flags, the apply state machine
//! over mvcc, and etcd's gRPC services over consensus.
//!
//! A one-member cluster in process, written to and read through its gRPC API:
//!
//! ```
//! use cairn_api::etcdserverpb::kv_client::KvClient;
//! use cairn_api::etcdserverpb::{PutRequest, RangeRequest};
//! use cairn_server::config::{Invocation, parse};
//!
//! # fn free_port() -> std::io::Result<u16> {
//! #     Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
//! # }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let client = format!("http://127.0.0.1:{}", free_port()?);
//! let peer = format!("http://127.0.0.1:{}", free_port()?);
//! let data_dir = dir.path().display().to_string();
//! let args = [
//!     "cairn", "--name", "m0", "--data-dir", &data_dir,
//!     "--listen-client-urls", &client, "--advertise-client-urls", &client,
//!     "--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer,
//!     "--initial-cluster", &format!("m0={peer}"),
//! ];
//! let Invocation::Run(config) = parse(args, &[])? else { unreachable!() };
//!
//! tokio::runtime::Runtime::new()?.block_on(async move {
//!     tokio::spawn(cairn_server::run(*config));
//!     let mut kv = loop {
//!         match KvClient::connect(client.clone()).await {
//!             Ok(kv) => break kv,
//!             Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
//!         }
//!     };
//!     kv.put(PutRequest { key: "k".into(), value: "v".into(), ..Default::default() }).await?;
//!     let got = kv.range(RangeRequest { key: "k".into(), ..Default::default() }).await?;
//!     assert_eq!(&got.into_inner().kvs[0].value[..], b"v");
//!     Ok(())
//! })
//! # }
//! ```

mod alarms;
mod apply;
mod auth;
mod auth_service;
mod backup;
pub mod cli;
mod client_command;
mod client_tls;
mod cluster_service;
mod compactor;
pub mod config;
mod corruption;
mod damage;
mod disk_space;
mod election_service;
mod forward;
mod forwarding_service;
pub mod health_check;
mod http;
pub mod ids;
mod kv_service;
mod lease_service;
mod leases;
mod lock_service;
mod maintenance_service;
mod member;
mod member_auth;
pub mod migrate;
mod peer_probe;
mod proposal;
mod server;
mod shard_events;
pub mod shard_listing;
mod shard_maintenance;
mod shards;
mod stopping;
mod validate;
mod watch_service;

pub use server::{ServerError, run};
