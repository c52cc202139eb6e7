//! The gateway's side of the gRPC API: any tower service that answers gRPC
//! requests (a tonic `Channel`, or a member's own routes called in process),
//! and a codec that passes messages as their encoded bytes, so one client
//! serves every method.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::{Status, Streaming};
use tower::BoxError;
use tower::util::BoxCloneSyncService;

/// A gRPC endpoint: requests in, responses out, as tonic's client sends them.
pub type GrpcService = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    TransportError,
>;

/// The endpoint failed to take a request. A named type rather than a boxed
/// error, which async code cannot prove `Send` for every lifetime.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(BoxError);

impl TransportError {
    pub fn new(error: BoxError) -> Self {
        TransportError(error)
    }
}

/// Boxes any service that answers gRPC over HTTP requests.
pub fn boxed<S, B>(service: S) -> GrpcService
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use tower::ServiceExt as _;
    BoxCloneSyncService::new(
        service
            .map_response(|response: http::Response<B>| response.map(tonic::body::Body::new))
            .map_err(|e: S::Error| TransportError(e.into())),
    )
}

/// Messages as their protobuf encoding, in both directions.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A client of one gRPC endpoint, cheap to clone.
///
/// Like etcd's gateway, which reaches its server over one gRPC connection,
/// it has at most the server's --max-concurrent-streams calls open at once;
/// further calls wait for one to end.
#[derive(Clone)]
pub struct Client {
    service: GrpcService,
    streams: Arc<Semaphore>,
}

/// A response stream, holding its share of the concurrent streams.
pub struct ResponseStream {
    pub messages: Streaming<Bytes>,
    pub permit: OwnedSemaphorePermit,
}

impl Client {
    pub fn new(service: GrpcService, max_concurrent_streams: u32) -> Self {
        let permits = (max_concurrent_streams as usize).clamp(1, Semaphore::MAX_PERMITS);
        Client {
            service,
            streams: Arc::new(Semaphore::new(permits)),
        }
    }

    async fn stream_permit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.streams
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the gateway is closing"))
    }

    /// The endpoint, for tonic's typed clients.
    pub fn service(&self) -> GrpcService {
        self.service.clone()
    }

    async fn ready(&self) -> Result<tonic::client::Grpc<GrpcService>, Status> {
        let mut grpc = tonic::client::Grpc::new(self.service.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("gRPC service not ready: {e}")))?;
        Ok(grpc)
    }

    /// One request, one response.
    pub async fn unary(
        &self,
        path: &str,
        message: Bytes,
        token: Option<&str>,
    ) -> Result<Bytes, Status> {
        let path = path_and_query(path)?;
        let _stream = self.stream_permit().await?;
        let mut grpc = self.ready().await?;
        let response = grpc.unary(request(message, token), path, RawCodec).await?;
        Ok(response.into_inner())
    }

    /// A stream of requests (possibly of one) and a stream of responses.
    pub async fn streaming<S>(
        &self,
        path: &str,
        messages: S,
        token: Option<&str>,
    ) -> Result<ResponseStream, Status>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        let path = path_and_query(path)?;
        let permit = self.stream_permit().await?;
        let mut grpc = self.ready().await?;
        let response = grpc
            .streaming(request(messages, token), path, RawCodec)
            .await?;
        Ok(ResponseStream {
            messages: response.into_inner(),
            permit,
        })
    }
}

fn path_and_query(path: &str) -> Result<PathAndQuery, Status> {
    PathAndQuery::try_from(path).map_err(|e| Status::internal(format!("bad gRPC path {path}: {e}")))
}

/// A request carrying the caller's auth token the way etcd's own gateway
/// passes it on: as the `token` metadata.
fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = token.and_then(|t| MetadataValue::try_from(t).ok()) {
        request.metadata_mut().insert("token", value);
    }
    request
}
