//! Starting a member: identity, store, consensus, client listeners, and the
//! start-up milestones that operators and etcd's tools wait for.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use cairn_api::etcdserverpb::cluster_server::ClusterServer;
use cairn_api::etcdserverpb::kv_server::KvServer;
use cairn_api::etcdserverpb::maintenance_server::MaintenanceServer;
use cairn_consensus::{Node, NodeConfig};
use cairn_mvcc::Store;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::apply::Applier;
use crate::cluster_service::ClusterService;
use crate::config::ServerConfig;
use crate::kv_service::KvService;
use crate::maintenance_service::MaintenanceService;
use crate::member::Member;
use crate::{compactor, ids};

/// gRPC's own framing allowance on top of --max-request-bytes, as etcd's.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Who this member is. Fixed at first start: a restarted member keeps its
/// IDs whatever --initial-cluster now says, as etcd does.
struct Identity {
    member_id: u64,
    cluster_id: u64,
}

fn load_or_create_identity(dir: &Path, config: &ServerConfig) -> anyhow::Result<Identity> {
    let file = dir.join("identity");
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let mut parts = text.split_whitespace().map(|p| u64::from_str_radix(p, 16));
            match (parts.next(), parts.next()) {
                (Some(Ok(member_id)), Some(Ok(cluster_id))) => Ok(Identity {
                    member_id,
                    cluster_id,
                }),
                _ => anyhow::bail!("{} is corrupt", file.display()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let member_id = ids::member_id(config.own_peer_urls()?, &config.initial_cluster_token);
            let cluster_id = ids::cluster_id(&[member_id]);
            let tmp = dir.join("identity.tmp");
            std::fs::write(&tmp, format!("{member_id:x} {cluster_id:x}\n"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &file)?;
            Ok(Identity {
                member_id,
                cluster_id,
            })
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Resolves `http://host:port` to the address to bind.
async fn listen_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let host_port = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("{url}: only http:// client URLs are supported"))?
        .trim_end_matches('/');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {url}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| anyhow::anyhow!("{url} resolves to no address"))
}

/// Runs a member until it is asked to stop or its consensus dies.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    tracing::info!(name = %config.name, "etcdserver: name = {}", config.name);
    tracing::info!("etcdserver: data dir = {}", config.data_dir.display());
    let member_dir = config.data_dir.join("member");
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("creating {}", member_dir.display()))?;
    let identity = load_or_create_identity(&member_dir, &config)?;
    tracing::info!(
        "etcdserver: starting member {:x} in cluster {:x}",
        identity.member_id,
        identity.cluster_id
    );

    let store = Store::open(&member_dir.join("kv")).context("opening the key-value store")?;
    let election_ticks =
        (config.election_timeout.as_millis() / config.heartbeat_interval.as_millis()) as usize;
    let node = Node::start(
        NodeConfig {
            id: identity.member_id,
            initial_voters: vec![identity.member_id],
            log_dir: member_dir.join("raft"),
            tick_interval: config.heartbeat_interval,
            election_ticks,
            heartbeat_ticks: 1,
            snapshot_count: config.snapshot_count,
        },
        Applier::new(store.clone()),
    )
    .context("starting raft")?;

    let member = Arc::new(Member {
        name: config.name.clone(),
        id: identity.member_id,
        cluster_id: identity.cluster_id,
        peer_urls: config.initial_advertise_peer_urls.clone(),
        client_urls: config.advertise_client_urls.clone(),
        data_dir: member_dir.clone(),
        store,
        node: node.clone(),
        max_request_bytes: config.max_request_bytes,
        max_txn_ops: config.max_txn_ops,
        request_timeout: std::time::Duration::from_secs(5) + 2 * config.election_timeout,
    });

    // Wait until the log is replayed and this member leads, so the first
    // client sees every acknowledged write.
    member
        .linearizable_barrier()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    tracing::info!("etcdserver/membership: set the initial cluster version to 3.4");
    tracing::info!("etcdserver/api: enabled capabilities for version 3.4");
    tracing::info!(
        "etcdserver: published {{Name:{} ClientURLs:[{}]}} to cluster {:x}",
        config.name,
        config.advertise_client_urls.join(" "),
        identity.cluster_id
    );

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let max_message = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
    for url in &config.listen_client_urls {
        let addr = listen_addr(url).await?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {url}"))?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let router = tonic::transport::Server::builder()
            .add_service(
                KvServer::new(KvService::new(member.clone()))
                    .max_decoding_message_size(max_message),
            )
            .add_service(MaintenanceServer::new(MaintenanceService::new(
                member.clone(),
            )))
            .add_service(ClusterServer::new(ClusterService::new(member.clone())));
        let mut stop = shutdown_rx.clone();
        servers.push(tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }));
        tracing::info!("embed: ready to serve client requests");
        tracing::warn!(
            "embed: serving insecure client requests on {addr}, this is strongly discouraged!"
        );
    }

    let compaction = compactor::spawn(member.clone(), config.auto_compaction.clone());

    let stop_reason = tokio::select! {
        _ = shutdown_signal() => None,
        reason = node.stopped() => Some(reason.unwrap_or_else(|| "raft stopped".into())),
    };
    tracing::info!("stopping member {:x}", identity.member_id);
    if let Some(task) = compaction {
        task.abort();
    }
    let _ = shutdown_tx.send(true);
    for server in servers {
        let _ = server.await;
    }
    tokio::task::spawn_blocking(move || node.shutdown()).await?;
    match stop_reason {
        Some(reason) => anyhow::bail!("member stopped: {reason}"),
        None => Ok(()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
