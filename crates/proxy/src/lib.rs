//! The grpc-proxy (`cairn grpc-proxy start`, `cairn-grpc-proxy`): serves the
//! whole etcd v3 client API by forwarding to the members, with
//! - watch coalescing: client watchers of one range share one upstream
//!   watch, each still getting exactly the events from its own start
//!   revision ([`watch`]);
//! - lease keep-alive coalescing: one upstream keep-alive stream, one
//!   request in flight per lease ([`lease`]);
//! - a read cache for serializable ranges that is never stale ([`cache`]);
//! - `--namespace`, `--resolver-prefix` and Prometheus metrics.
//!
//! Also etcd's v2 proxy mode (`cairn --proxy on`, [`v2`]).
//!
//! A proxy started in process with etcd's flags, answering on its metrics
//! address before any member is up (members are dialled lazily):
//!
//! ```
//! use clap::Parser as _;
//! use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
//!
//! # fn free_addr() -> std::io::Result<String> {
//! #     Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
//! # }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (listen, metrics) = (free_addr()?, free_addr()?);
//! let config = cairn_proxy::ProxyConfig::try_parse_from([
//!     "grpc-proxy start", "--endpoints", "127.0.0.1:2379",
//!     "--listen-addr", &listen, "--metrics-addr", &format!("http://{metrics}"),
//! ])?;
//! tokio::runtime::Runtime::new()?.block_on(async move {
//!     tokio::spawn(cairn_proxy::run(config));
//!     let mut page = String::new();
//!     while !page.contains("grpc_proxy_cache_keys_total") {
//!         tokio::time::sleep(std::time::Duration::from_millis(20)).await;
//!         page.clear();
//!         let Ok(mut conn) = tokio::net::TcpStream::connect(&metrics).await else { continue };
//!         conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n").await?;
//!         conn.read_to_string(&mut page).await?;
//!     }
//!     Ok(())
//! })
//! # }
//! ```

mod cache;
mod error;
mod forward;
mod kv;
mod lease;
mod metrics;
mod namespace;
mod resolver;
mod tls;
mod upstream;
pub mod v2;
mod watch;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use cairn_api::etcdserverpb::auth_server::AuthServer;
use cairn_api::etcdserverpb::cluster_server::ClusterServer;
use cairn_api::etcdserverpb::kv_server::KvServer;
use cairn_api::etcdserverpb::lease_server::LeaseServer;
use cairn_api::etcdserverpb::maintenance_server::MaintenanceServer;
use cairn_api::etcdserverpb::watch_server::WatchServer;
use cairn_api::v3electionpb::election_server::ElectionServer;
use cairn_api::v3lockpb::lock_server::LockServer;
use cairn_net::{Accept, ClientConn};
use clap::Parser;
use tokio::net::TcpListener;

use crate::cache::ReadCache;
use crate::lease::{KeepAlives, LeaseProxy};
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::resolver::Registry;
use crate::upstream::Upstream;

pub use crate::error::Error;

/// Requests as large as a member accepts by default (1.5 MiB) plus gRPC's
/// framing, and then some: the members enforce their own limit.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// etcd's `grpc-proxy start` flags.
#[derive(Parser, Debug, Clone)]
#[command(name = "grpc-proxy start", about = "Start the grpc-proxy")]
// As Go flags: a flag given twice takes its last value (etcd's e2e harness
// passes --client-crl-file twice).
#[command(args_override_self = true)]
pub struct ProxyConfig {
    /// Comma-separated member client URLs.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// Where the proxy serves clients (host:port).
    #[arg(long, default_value = "127.0.0.1:23790")]
    pub listen_addr: String,
    /// The address clients reach this proxy at (registered under
    /// --resolver-prefix).
    #[arg(long, default_value = "")]
    pub advertise_client_url: String,
    /// Prefix every key with this; strip it from what comes back.
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// Register the proxy under this prefix, and list the registered proxies
    /// as the members.
    #[arg(long, default_value = "")]
    pub resolver_prefix: String,
    /// The TTL, in seconds, of the registration's lease.
    #[arg(long, default_value_t = 60)]
    pub resolver_ttl: i64,
    /// Client certificate for the members.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client key for the members.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// CA bundle to verify the members with.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Serving certificate for clients.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    /// Serving key for clients.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// CA bundle clients' certificates must chain to.
    #[arg(long)]
    pub trusted_ca_file: Option<PathBuf>,
    /// Serve /metrics and /health here (http://host:port).
    #[arg(long, default_value = "")]
    pub metrics_addr: String,
    /// How often watchers that asked for progress notifications and saw no
    /// events get one (a Go duration, as the member's flag).
    #[arg(long, default_value = "10m", value_parser = go_duration)]
    pub experimental_watch_progress_notify_interval: std::time::Duration,
    /// Watch responses larger than this go in fragments to watchers that
    /// ask for them (the member's flag of the same name and default).
    #[arg(long, default_value_t = 1536 * 1024)]
    pub max_request_bytes: usize,
    /// Cached serializable range responses (0 turns the cache off).
    #[arg(long, default_value_t = 2048)]
    pub cache_size: usize,
    /// Under auth, the user the read cache's watch on every key runs as
    /// (`name:password`, a user who may read every key); without it a
    /// cache watch started while auth is on is refused, and the cache
    /// serves nothing.
    #[arg(long)]
    pub cache_user: Option<String>,
    /// CRL of client certificates to refuse (with --trusted-ca-file).
    #[arg(long)]
    pub client_crl_file: Option<PathBuf>,
    /// TLS for clients with a self-signed certificate (kept under
    /// --data-dir), when --cert-file, --key-file and --trusted-ca-file are
    /// not given.
    #[arg(long)]
    pub auto_tls: bool,
    /// Do not verify the members' certificates (for testing only).
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// TLS cipher suites between clients and the proxy, comma-separated
    /// (Go's names, as etcd's); empty for the defaults.
    #[arg(long, default_value = "")]
    pub listen_cipher_suites: String,
    /// Where --auto-tls keeps its certificate.
    #[arg(long, default_value = "default.proxy")]
    pub data_dir: PathBuf,
    /// etcd's flag: log at debug level.
    #[arg(long)]
    pub debug: bool,
}

/// The command line of both `cairn grpc-proxy start ...` (arguments after
/// `start`) and `cairn-grpc-proxy [start] ...`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let config = match ProxyConfig::try_parse_from(args) {
        Ok(config) => config,
        Err(e) => e.exit(),
    };
    init_tracing(if config.debug { "debug" } else { "info" });
    block_on(run(config))
}

/// `cairn --proxy on ...`: etcd's v2 proxy mode.
pub fn main_v2(args: &[String]) -> ExitCode {
    init_tracing("info");
    match v2::V2Config::parse(args) {
        Ok(config) => block_on(v2::run(config)),
        Err(e) => {
            tracing::error!("{}", error::report(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn block_on<E: std::error::Error>(work: impl Future<Output = Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error::report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs the proxy until SIGINT or SIGTERM.
pub async fn run(config: ProxyConfig) -> Result<(), Error> {
    // As etcd's: the proxy's client certificate must not name a user, or
    // every client behind the proxy would act as that user under auth.
    if let Some(cert) = &config.cert {
        cairn_net::check_empty_common_name(cert, "--cert")?;
    }
    // --cert, --key and --cacert only matter for https endpoints (etcd's e2e
    // harness passes them along with http ones too).
    let client_tls = if config.endpoints.iter().any(|e| e.starts_with("https://")) {
        Some(tls::client_config(
            config.cert.as_deref(),
            config.key.as_deref(),
            config.cacert.as_deref(),
            config.insecure_skip_tls_verify,
        )?)
    } else {
        None
    };
    let cipher_suites: Vec<String> = config
        .listen_cipher_suites
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    cairn_net::check_cipher_suites(&cipher_suites).map_err(tls::TlsError::from)?;
    let accept = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => tls::accept(
            cert,
            key,
            config.trusted_ca_file.as_deref(),
            config.client_crl_file.as_deref(),
            &cipher_suites,
        )?,
        (None, None) if config.trusted_ca_file.is_some() => {
            return Err(Error::TrustedCaWithoutCert);
        }
        (None, None) if config.auto_tls => {
            let (cert, key) = tls::auto_tls(&config.data_dir, &config.listen_addr)?;
            tls::accept(
                &cert,
                &key,
                None,
                config.client_crl_file.as_deref(),
                &cipher_suites,
            )?
        }
        (None, None) => Accept::plain("grpc-proxy"),
        _ => return Err(Error::CertWithoutKey),
    };
    let upstream = Upstream::new(&config.endpoints, client_tls)?;
    let metrics = Arc::new(Metrics::new().map_err(Error::Metrics)?);
    let namespace = Namespace::new(&config.namespace);
    let cache_user = match &config.cache_user {
        Some(spec) => Some(kv::CacheUser::parse(spec).ok_or(Error::CacheUser)?),
        None => None,
    };
    let cache = Arc::new(ReadCache::new(config.cache_size, metrics.clone()));
    if config.cache_size > 0 {
        tokio::spawn(kv::run_cache_watch(
            upstream.clone(),
            cache.clone(),
            cache_user,
        ));
    }
    let keepalives = KeepAlives::new(metrics.clone());
    tokio::spawn(keepalives.clone().run(upstream.clone()));

    let registry = if config.resolver_prefix.is_empty() {
        None
    } else {
        if config.advertise_client_url.is_empty() {
            return Err(Error::ResolverWithoutAdvertise);
        }
        if config.resolver_ttl < 5 {
            return Err(Error::ResolverTtl);
        }
        let registry = Registry::new(upstream.clone(), config.resolver_prefix.clone());
        tokio::spawn(registry.clone().register(
            config.advertise_client_url.clone(),
            config.resolver_ttl,
            keepalives.clone(),
        ));
        Some(registry)
    };

    if !config.metrics_addr.is_empty() {
        let addr = host_port(&config.metrics_addr);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen {
                addr: config.metrics_addr.clone(),
                source,
            })?;
        tracing::info!("grpc-proxy: serving metrics on {}", config.metrics_addr);
        tokio::spawn(metrics::serve(listener, metrics.clone()));
    }

    let listen = host_port(&config.listen_addr);
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen_addr.clone(),
            source,
        })?;
    let router = tonic::transport::Server::builder()
        .layer(metrics.grpc_layer())
        .add_service(
            KvServer::new(kv::KvProxy::new(
                upstream.clone(),
                namespace.clone(),
                cache.clone(),
            ))
            .max_decoding_message_size(MAX_REQUEST),
        )
        .add_service(WatchServer::new(watch::WatchProxy::new(
            upstream.clone(),
            namespace.clone(),
            cache.clone(),
            metrics.clone(),
            config.experimental_watch_progress_notify_interval,
            config.max_request_bytes,
        )))
        .add_service(LeaseServer::new(LeaseProxy {
            upstream: upstream.clone(),
            namespace: namespace.clone(),
            cache: cache.clone(),
            keepalives,
            metrics: metrics.clone(),
        }))
        .add_service(ClusterServer::new(forward::ClusterProxy {
            upstream: upstream.clone(),
            registry,
        }))
        .add_service(MaintenanceServer::new(forward::MaintenanceProxy {
            upstream: upstream.clone(),
        }))
        .add_service(
            AuthServer::new(forward::AuthProxy {
                upstream: upstream.clone(),
            })
            .max_decoding_message_size(MAX_REQUEST),
        )
        .add_service(LockServer::new(forward::LockProxy {
            upstream: upstream.clone(),
            namespace: namespace.clone(),
        }))
        .add_service(ElectionServer::new(forward::ElectionProxy {
            upstream,
            namespace,
        }));
    tracing::info!(address = %config.listen_addr, "started gRPC proxy");
    let shutdown = shutdown_signal();
    // Every connection goes through AuthorityFix: Go clients dialing
    // "http://host:port" send that as the HTTP/2 authority, which h2
    // refuses.
    let (incoming, _) = accept.spawn::<ClientConn>(listener);
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

fn go_duration(text: &str) -> Result<std::time::Duration, String> {
    cairn_api::duration::parse_go_duration(text.trim())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("not a positive Go duration: {text}"))
}

fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
