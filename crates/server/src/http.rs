//! One port for gRPC and HTTP, as etcd's: the client listeners serve
//! HTTP/1.1 as well as HTTP/2 (hyper tells them apart by the HTTP/2
//! preface when a connection opens), and every request whose path is not
//! a gRPC method goes to the HTTP gateway (`cairn-gateway`), which calls
//! the same gRPC services in process. gRPC requests are routed as before;
//! the only per-call cost added to them is the metrics counting.

use std::sync::Arc;

use cairn_gateway::{Gateway, Options};
use tonic::service::Routes;
use tonic::transport::server::Router;

use crate::config::{ETCD_CLUSTER_VERSION, ETCD_VERSION, ServerConfig};
use crate::member::Member;
use crate::server::ServerError;
use cairn_metrics::{MemberSample, Metrics};

use crate::shard_listing;

/// The client listeners' router: `grpc` (counted for /metrics) and the
/// gateway for everything else.
pub fn client_router(
    grpc: Routes,
    config: &ServerConfig,
    member: &Arc<Member>,
    metrics: &Arc<Metrics>,
) -> Result<(Router, Gateway), ServerError> {
    let (scraped, scraped_member) = (metrics.clone(), member.clone());
    // gRPC calls are counted for /metrics, and so are the /v3 gateway's, as
    // etcd's grpc-gateway calls go through its gRPC server.
    let counted = grpc.clone().into_axum_router().layer(metrics.grpc_layer());
    let gateway = Gateway::with_v3(
        cairn_gateway::boxed(counted.clone()),
        cairn_gateway::boxed(grpc),
        Options {
            server_version: ETCD_VERSION.to_string(),
            cluster_version: ETCD_CLUSTER_VERSION.to_string(),
            enable_v2: config.enable_v2,
            max_request_bytes: config.max_request_bytes,
            max_concurrent_streams: config.max_concurrent_streams,
            metrics: Some(Arc::new(move || scraped.render(&sample(&scraped_member)))),
            shards: member.shards().map(|shards| {
                let (id, shards) = (member.id, shards.clone());
                let listed: cairn_gateway::JsonSource = Arc::new(move || {
                    serde_json::to_vec(&shard_listing::listing(id, &shards)).unwrap_or_default()
                });
                listed
            }),
        },
    )
    .map_err(ServerError::Gateway)?;
    let routes = Routes::from(counted.fallback_service(gateway.clone()));
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .accept_http1(true)
        .add_routes(routes);
    Ok((router, gateway))
}

/// What `member` reports of itself on /metrics.
fn sample(member: &Member) -> MemberSample {
    let raft = member.node.status();
    let keys = member.store.key_count();
    // Every store held, as Status counts them: with --shards the cluster
    // group's holds no keys.
    let size = member.db_size();
    MemberSample {
        id: member.id,
        has_leader: raft.leader != 0,
        is_leader: raft.leader != 0 && raft.leader == raft.id,
        is_learner: raft.is_learner,
        committed_index: raft.commit_index,
        applied_index: raft.applied_index,
        raft: member.node.metrics().snapshot(),
        keys,
        revision: member.store.current_revision().max(0) as u64,
        compact_revision: member.store.compact_revision().max(0) as u64,
        db_total_bytes: size.total,
        db_in_use_bytes: size.in_use,
        block_cache_bytes: member.store.block_cache_bytes(),
        shards: member
            .shards()
            .map_or_else(Vec::new, |shards| shard_listing::samples(member.id, shards)),
    }
}

/// Serves /metrics and /health on each of --listen-metrics-urls until
/// `stop` turns true; https (and unixs) ones with the client TLS
/// configuration, as etcd does.
pub async fn serve_metrics(
    urls: &[String],
    gateway: &Gateway,
    client_tls: Option<&cairn_net::ServerTls>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), ServerError> {
    for url in urls {
        let parsed = cairn_net::EtcdUrl::parse(url).map_err(ServerError::Url)?;
        let accept = if parsed.tls {
            let tls = client_tls.ok_or_else(|| ServerError::NoClientCertificate(url.clone()))?;
            cairn_net::Accept::new(Some(tls), "metrics")
        } else {
            cairn_net::Accept::plain("metrics")
        };
        let listener = crate::server::listen(url, &parsed).await?;
        tracing::info!("embed: serving metrics on {url}");
        let (incoming, _) = accept.spawn::<cairn_net::ServerStream>(listener);
        let mut stop = stop.clone();
        tokio::spawn(cairn_gateway::serve(
            incoming,
            gateway.metrics_only(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
    }
    Ok(())
}
