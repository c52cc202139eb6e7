//! Starting a member: identity, store, consensus, client listeners, and the
//! start-up milestones that operators and etcd's tools wait for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_api::cairnpb::forwarding_server::ForwardingServer;
use cairn_api::etcdserverpb::auth_server::AuthServer;
use cairn_api::etcdserverpb::cluster_server::ClusterServer;
use cairn_api::etcdserverpb::kv_server::KvServer;
use cairn_api::etcdserverpb::lease_server::LeaseServer;
use cairn_api::etcdserverpb::maintenance_server::MaintenanceServer;
use cairn_api::etcdserverpb::watch_server::WatchServer;
use cairn_api::v3electionpb::election_server::ElectionServer;
use cairn_api::v3lockpb::lock_server::LockServer;
use cairn_consensus::TransportError;
use cairn_consensus::{
    GroupId, MembershipChange, Node, NodeConfig, PeerInfo, PeerNetwork, PeerTls, SharedRaftLog,
    StopReason,
};
use cairn_gateway::DescriptorError;
use cairn_mvcc::{MvccError, Store};
use cairn_net::{Accept, ClientConn, EtcdUrl, Listener};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, Router};

use crate::apply::{Applier, OpenError};
use crate::auth_service::AuthService;
use crate::cluster_service::ClusterService;
use crate::config::{ConfigError, ServerConfig};
use crate::corruption::CorruptionError;
use crate::disk_space::{self, DiskSpace};
use crate::election_service::ElectionService;
use crate::forwarding_service::ForwardingService;
use crate::kv_service::KvService;
use crate::lease_service::LeaseService;
use crate::lock_service::LockService;
use crate::maintenance_service::MaintenanceService;
use crate::member::Member;
use crate::migrate::RestoreError;
use crate::shards::{Shards, ShardsError};
use crate::watch_service::WatchService;
use crate::{client_tls, compactor, corruption, ids, leases};
use cairn_metrics::Metrics;

/// gRPC's own framing allowance on top of --max-request-bytes, as etcd's.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Why a member could not start, or stopped on a failure.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A file, listener or address, with what was being done to it.
    #[error("{context}")]
    IoAt {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is corrupt", .0.display())]
    CorruptIdentity(PathBuf),
    #[error("--initial-cluster-state=existing: cannot reach the cluster's other members")]
    Join(#[source] TransportError),
    #[error("the cluster has no member with peer URLs {0}; add it first (etcdctl member add)")]
    NotAdded(String),
    #[error("generating the --peer-auto-tls certificate")]
    PeerAutoTls(#[source] cairn_net::NetError),
    /// The client listeners' certificates, keys, CAs or CRLs.
    #[error(transparent)]
    ClientTls(cairn_net::NetError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("opening the key-value store")]
    Store(#[source] MvccError),
    #[error(transparent)]
    Apply(#[from] OpenError),
    #[error("starting raft")]
    Raft(#[source] cairn_consensus::Error),
    /// A URL etcd's flags would refuse.
    #[error(transparent)]
    Url(cairn_net::NetError),
    #[error("{0}: no client TLS certificate")]
    NoClientCertificate(String),
    #[error("starting the HTTP gateway")]
    Gateway(#[source] DescriptorError),
    #[error("registering metrics")]
    Metrics(#[source] cairn_metrics::MetricsError),
    #[error(transparent)]
    Corruption(#[from] CorruptionError),
    #[error("raft stopped before the member published itself: {0}")]
    StoppedBeforePublish(StopReason),
    #[error("member stopped: {0}")]
    Stopped(String),
    /// The member stopped before on its damaged store.
    #[error("{0}")]
    Damaged(String),
    #[error(transparent)]
    Shutdown(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Shards(#[from] ShardsError),
    #[error("adding a member to a cluster with --shards is not supported yet")]
    JoinSharded,
}

fn io_at(context: String) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::IoAt { context, source }
}

pub(crate) use cairn_api::error::report;

/// Who this member is. Fixed at first start: a restarted member keeps its
/// IDs whatever --initial-cluster now says, as etcd does.
struct Identity {
    member_id: u64,
    cluster_id: u64,
    /// The members a new cluster starts with; empty when joining or restarting.
    initial_members: Vec<PeerInfo>,
    /// The members of the cluster being joined, as they answered.
    join_members: Vec<PeerInfo>,
}

fn read_identity(file: &Path) -> Result<Option<(u64, u64)>, ServerError> {
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let mut parts = text.split_whitespace().map(|p| u64::from_str_radix(p, 16));
            match (parts.next(), parts.next()) {
                (Some(Ok(member_id)), Some(Ok(cluster_id))) => Ok(Some((member_id, cluster_id))),
                _ => Err(ServerError::CorruptIdentity(file.to_path_buf())),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(format!("reading {}", file.display()))(e)),
    }
}

fn write_identity(file: &Path, member_id: u64, cluster_id: u64) -> Result<(), ServerError> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{member_id:x} {cluster_id:x}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, file)?;
    // Without it the name may not survive a power loss, and the member
    // would start again as a new one beside its old data.
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

async fn load_or_create_identity(
    dir: &Path,
    config: &ServerConfig,
    peer_tls: Option<&PeerTls>,
) -> Result<Identity, ServerError> {
    let file = dir.join("identity");
    if let Some((member_id, cluster_id)) = read_identity(&file)? {
        return Ok(Identity {
            member_id,
            cluster_id,
            initial_members: Vec::new(),
            join_members: Vec::new(),
        });
    }
    let own_urls = config.own_peer_urls()?;
    let identity = if config.initial_cluster_state_new {
        let initial_members: Vec<PeerInfo> = config
            .initial_cluster
            .iter()
            .map(|(name, urls)| PeerInfo {
                id: ids::member_id(urls, &config.initial_cluster_token),
                name: name.clone(),
                peer_urls: urls.clone(),
                client_urls: Vec::new(),
                is_learner: false,
            })
            .collect();
        let ids: Vec<u64> = initial_members.iter().map(|m| m.id).collect();
        Identity {
            member_id: ids::member_id(own_urls, &config.initial_cluster_token),
            cluster_id: ids::cluster_id(&ids),
            initial_members,
            join_members: Vec::new(),
        }
    } else {
        // Joining: the cluster knows this member by the peer URLs it was
        // added with (etcdctl member add); ask the other members.
        let others: Vec<String> = config
            .initial_cluster
            .iter()
            .filter(|(name, _)| *name != config.name)
            .flat_map(|(_, urls)| urls.clone())
            .collect();
        let (cluster_id, members) = cairn_consensus::fetch_cluster(&others, peer_tls)
            .await
            .map_err(ServerError::Join)?;
        let mut own_sorted = own_urls.to_vec();
        own_sorted.sort();
        let me = members
            .iter()
            .find(|m| {
                let mut urls = m.peer_urls.clone();
                urls.sort();
                urls == own_sorted
            })
            .ok_or_else(|| ServerError::NotAdded(own_urls.join(",")))?;
        Identity {
            member_id: me.id,
            cluster_id,
            initial_members: Vec::new(),
            join_members: members.clone(),
        }
    };
    write_identity(&file, identity.member_id, identity.cluster_id)?;
    Ok(identity)
}

fn read_pem(path: &str, what: &str) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(io_at(format!("reading {what} {path}")))
}

/// The peer TLS that etcd's --peer-* flags ask for.
fn peer_tls(config: &ServerConfig) -> Result<Option<PeerTls>, ServerError> {
    let flags = &config.peer_tls;
    if !flags.cert_file.is_empty() {
        let trusted_ca_pem = if flags.trusted_ca_file.is_empty() {
            None
        } else {
            Some(read_pem(&flags.trusted_ca_file, "--peer-trusted-ca-file")?)
        };
        return Ok(Some(PeerTls {
            cert_pem: read_pem(&flags.cert_file, "--peer-cert-file")?,
            key_pem: read_pem(&flags.key_file, "--peer-key-file")?,
            trusted_ca_pem,
            client_cert_auth: flags.client_cert_auth,
            allowed_cn: Some(config.peer_cert_allowed_cn.clone()).filter(|cn| !cn.is_empty()),
            allowed_hostname: Some(config.peer_cert_allowed_hostname.clone())
                .filter(|host| !host.is_empty()),
        }));
    }
    if flags.auto_tls {
        let hosts: Vec<String> = config
            .listen_peer_urls
            .iter()
            .chain(&config.initial_advertise_peer_urls)
            .filter_map(|u| EtcdUrl::parse(u).ok().map(|u| u.host()))
            .collect();
        return Ok(Some(
            PeerTls::self_signed(&hosts).map_err(ServerError::PeerAutoTls)?,
        ));
    }
    Ok(None)
}

/// Binds a listener for `url` (`parsed`): a TCP port, or a Unix socket.
pub(crate) async fn listen(url: &str, parsed: &EtcdUrl) -> Result<Listener, ServerError> {
    Listener::bind(parsed)
        .await
        .map_err(io_at(format!("listening on {url}")))
}

/// Reads each of `urls`.
fn parse_urls(urls: &[String]) -> Result<Vec<EtcdUrl>, ServerError> {
    urls.iter()
        .map(|url| EtcdUrl::parse(url).map_err(ServerError::Url))
        .collect()
}

/// Runs a member until it is asked to stop or its consensus dies.
pub async fn run(config: ServerConfig) -> Result<(), ServerError> {
    tracing::info!(name = %config.name, "etcdserver: name = {}", config.name);
    tracing::info!("etcdserver: data dir = {}", config.data_dir.display());
    let member_dir = config.data_dir.join("member");
    // Synced into their parents: a power loss must not take away a new
    // member's directory once it has acknowledged anything.
    cairn_consensus::create_dir_durably(&member_dir)
        .map_err(io_at(format!("creating {}", member_dir.display())))?;
    let peer_tls = peer_tls(&config)?;
    // A data dir a restore wrote (`kv`) or an etcd data dir to migrate
    // (`snap/db`) holds its keys in one store, as before --shards: one
    // shard, so that --shards N refuses it rather than start with its keys
    // out of sight.
    let existing = ["identity", "kv", "snap/db"]
        .iter()
        .any(|file| member_dir.join(file).exists());
    let shard_count = crate::shards::recorded_count(&member_dir, config.shards, existing)?;
    if shard_count > 1 && !existing && !config.initial_cluster_state_new {
        return Err(ServerError::JoinSharded);
    }
    // Bad client certificates stop the member before it joins anything.
    let client_urls = parse_urls(&config.listen_client_urls)?;
    let client_hosts: Vec<String> = client_urls.iter().map(EtcdUrl::host).collect();
    let client_tls =
        client_tls::server_config(&config, &client_hosts).map_err(ServerError::ClientTls)?;
    // A plain and a TLS client URL on one address (http:// and https://,
    // or unix:// and unixs://) share a listener.
    let shares_with = |url: &EtcdUrl, tls: bool| {
        client_urls
            .iter()
            .any(|u| u.tls == tls && u.address == url.address)
    };
    // Bound first, as etcd's embed binds them before it opens its backend:
    // a client that connects while the member starts (or etcd's e2e
    // harness, once it saw "published") waits for it to serve, instead of
    // being refused and backing off for a second or more.
    let mut client_listeners = Vec::new();
    for (url, parsed) in config.listen_client_urls.iter().zip(&client_urls) {
        if !parsed.tls && client_tls.is_some() && shares_with(parsed, true) {
            continue;
        }
        client_listeners.push((url, parsed, listen(url, parsed).await?));
    }
    // A data dir from `cairn snapshot restore`, or etcd's, bootstraps the
    // membership the restore recorded instead of the flags' (as etcd's).
    let restored = crate::migrate::restored_bootstrap(&member_dir, &config)?;
    let from_backup = restored.is_some();
    let identity = match restored {
        Some(restored) => {
            write_identity(
                &member_dir.join("identity"),
                restored.member_id,
                restored.cluster_id,
            )?;
            Identity {
                member_id: restored.member_id,
                cluster_id: restored.cluster_id,
                initial_members: restored
                    .members
                    .into_iter()
                    .map(crate::migrate::peer)
                    .collect(),
                join_members: Vec::new(),
            }
        }
        None => load_or_create_identity(&member_dir, &config, peer_tls.as_ref()).await?,
    };
    tracing::info!(
        "etcdserver: starting member {:x} in cluster {:x}",
        identity.member_id,
        identity.cluster_id
    );

    crate::damage::check_start(&member_dir, identity.member_id).map_err(ServerError::Damaged)?;
    // fjall syncs the directories it makes inside, not this one's entry.
    let kv_dir = member_dir.join("kv");
    cairn_consensus::create_dir_durably(&kv_dir)
        .map_err(io_at(format!("creating {}", kv_dir.display())))?;
    let store = Store::open(&kv_dir).map_err(ServerError::Store)?;
    let election_ticks = config.election_ticks();
    let metrics = Arc::new(Metrics::new().map_err(ServerError::Metrics)?);
    let mut applier = Applier::open(store.clone(), &config)?;
    applier.count_into(metrics.store());
    let disk = DiskSpace::new(member_dir.clone(), config.disk_reserve)
        .map_err(|source| ServerError::IoAt {
            context: format!("reading the free space of {}", member_dir.display()),
            source,
        })?
        .map(Arc::new);
    if let Some(disk) = &disk {
        applier.keep_room_on(disk.clone());
    }
    let shared = applier.shared();
    let mut peer_listeners = Vec::new();
    for (url, parsed) in config
        .listen_peer_urls
        .iter()
        .zip(parse_urls(&config.listen_peer_urls)?)
    {
        peer_listeners.push(listen(url, &parsed).await?);
    }
    let group_config = |group: GroupId, data_dir: PathBuf| NodeConfig {
        id: identity.member_id,
        cluster_id: identity.cluster_id,
        group,
        initial_members: identity.initial_members.clone(),
        join_members: identity.join_members.clone(),
        data_dir,
        peer_listeners: Vec::new(),
        peer_tls: None,
        tick_interval: config.heartbeat_interval,
        election_ticks,
        heartbeat_ticks: 1,
        snapshot_count: config.snapshot_count,
        // Idle shards stop ticking; the cluster group finds dead leaders.
        hibernate: group != cairn_consensus::CLUSTER_GROUP,
    };
    // With --shards every group shares one peer network and one WAL.
    let mut sharding = None;
    let node = match shared.sequencer.clone() {
        None => Node::start(
            NodeConfig {
                peer_listeners,
                peer_tls: peer_tls.clone(),
                ..group_config(cairn_consensus::CLUSTER_GROUP, member_dir.clone())
            },
            applier,
        ),
        Some(sequencer) => {
            let network = PeerNetwork::start(
                identity.member_id,
                identity.cluster_id,
                peer_tls.clone(),
                peer_listeners,
            );
            let log = SharedRaftLog::open(&member_dir.join("wal")).map_err(ServerError::Raft)?;
            let node = Node::start_in(
                group_config(cairn_consensus::CLUSTER_GROUP, member_dir.clone()),
                applier,
                &network,
                &log,
            )
            .map_err(ServerError::Raft)?;
            let members: Vec<u64> = config
                .initial_cluster
                .iter()
                .map(|(_, urls)| ids::member_id(urls, &config.initial_cluster_token))
                .collect();
            let map = crate::shards::placement(
                &member_dir,
                shard_count,
                config.shard_replicas,
                &members,
            )?;
            let shards = Shards::start(
                &member_dir.join("shards"),
                identity.member_id,
                map,
                sequencer,
                shared.sequenced.clone(),
                group_config,
                &network,
                &log,
                shared.hub.clone(),
            )?;
            sharding = Some((network, Arc::new(shards)));
            Ok(node)
        }
    }
    .map_err(ServerError::Raft)?;

    let member = Arc::new(
        Member::new(
            identity.member_id,
            identity.cluster_id,
            member_dir.clone(),
            store,
            node.clone(),
            shared,
            &config,
        )
        .with_shards(sharding.as_ref().map(|(_, shards)| shards.clone())),
    );
    if let Some(shards) = member.shards() {
        shards.start_agent(member.clone());
        shards.start_feeds(&member);
    }

    // Publishing name and client URLs goes through the log like any write:
    // once it is applied here, this member has caught up with what was
    // committed before it, and the cluster knows how to reach it.
    publish(&member, &config).await?;
    if let Some(shards) = member.shards()
        && !shards.wait_for_leaders(member.request_timeout()).await
    {
        tracing::warn!("some shards have no leader yet; writes to them wait for one");
    }
    if let Some(shards) = member.shards() {
        shards.take_preferred_leaderships(member.id).await;
    }
    if from_backup {
        crate::migrate::drop_log_before_restore(&member)?;
    }
    if config.initial_corrupt_check {
        corruption::initial_check(&member).await?;
    }
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
    let mut gateway = None;
    for (url, parsed, listener) in client_listeners {
        let addr = listener.local_addr()?;
        let grpc = tonic::service::Routes::new(
            KvServer::new(KvService::new(member.clone())).max_decoding_message_size(max_message),
        )
        .add_service(WatchServer::new(WatchService::new(
            member.clone(),
            config.watch_progress_notify_interval,
        )))
        .add_service(LeaseServer::new(LeaseService::new(member.clone())))
        .add_service(MaintenanceServer::new(MaintenanceService::new(
            member.clone(),
        )))
        .add_service(ClusterServer::new(ClusterService::new(member.clone())))
        .add_service(AuthServer::new(AuthService::new(member.clone())))
        .add_service(LockServer::new(LockService::new(member.clone())))
        .add_service(ElectionServer::new(ElectionService::new(member.clone())))
        .add_service(
            ForwardingServer::new(ForwardingService::new(member.clone()))
                .max_decoding_message_size(usize::MAX),
        );
        // gRPC and the HTTP gateway share the port (crate::http).
        let (router, client_gateway) =
            crate::http::client_router(grpc, &config, &member, &metrics)?;
        gateway.get_or_insert(client_gateway);
        let stop = shutdown_rx.clone();
        let secure = parsed.tls;
        tracing::info!("embed: ready to serve client requests");
        // Every connection goes through AuthorityFix: Go clients dialing
        // "http://host:port" endpoints send that as the HTTP/2 authority,
        // which h2 refuses.
        let accept = match (&client_tls, secure) {
            (Some(tls), true) => {
                tracing::info!("embed: serving client requests on {addr}");
                let accept = Accept::new(Some(tls), "client");
                if shares_with(parsed, false) {
                    accept.or_plain()
                } else {
                    accept
                }
            }
            // The configuration check refuses https without a certificate.
            (None, true) => return Err(ServerError::NoClientCertificate(url.clone())),
            (tls, false) => {
                if tls.is_some() {
                    tracing::warn!(
                        "embed: the scheme of client url {url} is HTTP while key/cert files are presented; ignored key/cert files"
                    );
                }
                tracing::warn!(
                    "embed: serving insecure client requests on {addr}, this is strongly discouraged!"
                );
                Accept::plain("client")
            }
        };
        let (incoming, _) = accept.spawn::<ClientConn>(listener);
        servers.push(serve_clients(router, incoming, stop));
    }

    if let Some(gateway) = gateway {
        crate::http::serve_metrics(
            &config.listen_metrics_urls,
            &gateway,
            client_tls.as_ref(),
            &shutdown_rx,
        )
        .await?;
    }
    let compaction = compactor::spawn(member.clone(), config.auto_compaction.clone());
    let lease_leader = leases::spawn_leader_task(member.clone());
    let corruption_check =
        corruption::spawn_periodic(member.clone(), config.corrupt_check_interval);
    let disk_monitor = disk.map(|disk| disk_space::spawn_monitor(member.clone(), disk));
    let peer_probe = crate::peer_probe::spawn(member.clone(), peer_tls, metrics.clone());
    // With --shards members sign their calls to each other with it.
    let secret_keeper = member
        .shards()
        .map(|_| crate::member_auth::spawn_secret_keeper(member.clone()));

    let stop_reason = tokio::select! {
        _ = shutdown_signal() => StopReason::Shutdown,
        reason = node.stopped() => match reason {
            StopReason::Failed(reason) => StopReason::Failed(
                crate::damage::found_already(&member_dir, identity.member_id).unwrap_or(reason),
            ),
            reason => reason,
        },
        reason = crate::damage::found(&member_dir, identity.member_id) => StopReason::Failed(reason),
    };
    let damaged = cairn_mvcc::damage_found().borrow().is_some();
    tracing::info!("stopping member {:x}", identity.member_id);
    if let Some(task) = compaction {
        task.abort();
    }
    lease_leader.abort();
    peer_probe.abort();
    if let Some(task) = secret_keeper {
        task.abort();
    }
    if let Some(task) = corruption_check {
        task.abort();
    }
    if let Some(task) = disk_monitor {
        task.abort();
    }
    let _ = shutdown_tx.send(true);
    // Calls that would outlive the member (a grpc-proxy's watches and
    // keep-alives, a client's) end now with etcd's "server stopped"; as
    // etcd's stopServers, the calls still under way get the request
    // timeout to finish, and are cut when the process ends.
    member.stop_serving();
    let grace = tokio::time::sleep(member.request_timeout());
    tokio::pin!(grace);
    for server in servers {
        tokio::select! {
            _ = server => {}
            () = &mut grace => {
                tracing::warn!("client connections still open after the request timeout; closing them");
                break;
            }
        }
    }
    if let Some((network, shards)) = sharding {
        tokio::task::spawn_blocking(move || shards.shutdown()).await?;
        tokio::task::spawn_blocking(move || node.shutdown()).await?;
        drop(network);
    } else {
        tokio::task::spawn_blocking(move || node.shutdown()).await?;
    }
    // With nothing applying any more: the next start reads the key index
    // back whole instead of reading again what was stored since the last
    // checkpoint.
    let store = member.store.clone();
    // Not of a damaged store: the next start must not take it for sound.
    if !damaged && let Err(e) = tokio::task::spawn_blocking(move || store.checkpoint()).await? {
        tracing::warn!(error = %e, "could not checkpoint the key index; the next start reads more");
    }
    match stop_reason {
        StopReason::Failed(reason) => Err(ServerError::Stopped(reason)),
        // A removed member exits cleanly, as etcd's does.
        StopReason::Removed => {
            tracing::warn!("{}", StopReason::Removed);
            Ok(())
        }
        StopReason::Shutdown => Ok(()),
    }
}

/// Serves one client listener's connections until `stop` turns true.
fn serve_clients<IO, E>(
    router: Router,
    incoming: impl Stream<Item = Result<IO, E>> + Send + 'static,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<Result<(), tonic::transport::Error>>
where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    })
}

/// Proposes this member's name and client URLs until it succeeds (etcd
/// retries its publish the same way), unless the node stops first.
async fn publish(member: &Member, config: &ServerConfig) -> Result<(), ServerError> {
    let change = MembershipChange::Publish {
        id: member.id,
        name: config.name.clone(),
        client_urls: config.advertise_client_urls.clone(),
    };
    loop {
        let attempt = member.node.change_membership(change.clone());
        match tokio::time::timeout(member.request_timeout(), attempt).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(cairn_consensus::Error::Stopped)) => {
                let reason = member.node.stopped().await;
                return Err(ServerError::StoppedBeforePublish(reason));
            }
            Ok(Err(e)) => {
                // Expected while the cluster elects its first leader.
                tracing::debug!("publishing this member failed, retrying: {e}");
                tokio::time::sleep(config.heartbeat_interval * 5).await;
            }
            Err(_) => tracing::warn!("publishing this member timed out, retrying"),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_every_cause_as_anyhow_did() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = io_at("reading --peer-cert-file p.pem".to_string())(missing);
        assert_eq!(
            report(&error),
            "reading --peer-cert-file p.pem: no such file"
        );
        let corrupt = ServerError::CorruptIdentity(PathBuf::from("m/identity"));
        assert_eq!(report(&corrupt), "m/identity is corrupt");
    }

    #[test]
    fn urls_of_other_schemes_are_refused() {
        let refused = parse_urls(&["http://127.0.0.1:2379".to_owned(), "ftp://h:1".to_owned()])
            .err()
            .map(|e| report(&e));
        assert_eq!(
            refused.as_deref(),
            Some("URL scheme must be http, https, unix, or unixs: ftp://h:1")
        );
        assert!(parse_urls(&["unixs://localhost:2379".to_owned()]).is_ok());
    }
}
