//! Dialing a peer URL for tonic's client: TCP or a Unix socket, then
//! rustls when https or unixs (cairn-net's connector), with the transport's
//! HTTP/2 settings.

use tonic::transport::Channel;

use super::{CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, TransportError};

/// Opens an HTTP/2 connection to one peer URL.
pub(super) async fn connect(
    client_tls: &Option<Result<cairn_net::ClientTls, String>>,
    url: &str,
) -> Result<Channel, TransportError> {
    let tls = match client_tls {
        Some(Ok(config)) => Some(config),
        // Reported on each attempt to dial an https (or unixs) peer only.
        Some(Err(e)) if url.starts_with("https:") || url.starts_with("unixs:") => {
            return Err(TransportError::Tls(e.clone()));
        }
        _ => None,
    };
    let (endpoint, connector) = cairn_net::endpoint(url, tls)?;
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        // Snapshots stream megabytes: let the windows grow past 64 KiB.
        .http2_adaptive_window(true);
    Ok(endpoint.connect_with_connector(connector).await?)
}
