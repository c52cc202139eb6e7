//! An HTTP/1.1 client for the gateway tests: hyper's, one connection per
//! request, with streamed bodies read line by line as they arrive. Calls
//! block, so plain and async tests use them alike: each request runs on
//! the client's own runtime.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How long a request (or the next piece of a streamed body) may take.
const TIMEOUT: Duration = Duration::from_secs(20);

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("the HTTP client's runtime")
});

static CLIENT: LazyLock<Client<HttpConnector, Full<Bytes>>> = LazyLock::new(|| {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
});

/// Runs `future` on the client's runtime and waits for it, at most
/// [`TIMEOUT`]; None when it took longer.
fn block<F>(future: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    RUNTIME.spawn(async move {
        let _ = tx.send(tokio::time::timeout(TIMEOUT, future).await.ok());
    });
    rx.recv().expect("the HTTP client's task ended")
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A response whose body is still arriving.
pub struct HttpStream {
    pub status: u16,
    body: Option<Incoming>,
    pending: String,
}

async fn send(
    addr: String,
    method: String,
    path: String,
    content_type: &'static str,
    authorization: Option<String>,
    body: String,
) -> http::Response<Incoming> {
    let mut request = http::Request::builder()
        .method(method.as_str())
        .uri(format!("http://{addr}{path}"))
        .header(CONTENT_TYPE, content_type);
    if let Some(credentials) = authorization {
        let value = HeaderValue::from_str(&credentials).expect("an Authorization header");
        request = request.header(AUTHORIZATION, value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    CLIENT
        .request(request)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e:?}"))
}

fn whole(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &'static str,
    authorization: Option<String>,
    body: &str,
) -> HttpResponse {
    let sent = send(
        addr.to_string(),
        method.to_string(),
        path.to_string(),
        content_type,
        authorization,
        body.to_string(),
    );
    block(async move {
        let response = sent.await;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_string(), value)
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_else(|e| panic!("reading the body: {e}"));
        HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .unwrap_or_else(|| panic!("{method} http://{addr}{path}: no answer in {TIMEOUT:?}"))
}

/// One request; the whole response.
pub fn request(addr: &str, method: &str, path: &str, body: &str) -> HttpResponse {
    whole(addr, method, path, "application/json", None, body)
}

/// A form request, as curl -d sends it.
pub fn form(addr: &str, method: &str, path: &str, body: &str) -> HttpResponse {
    whole(
        addr,
        method,
        path,
        "application/x-www-form-urlencoded",
        None,
        body,
    )
}

/// A request with HTTP basic auth credentials.
pub fn request_as_user(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    user: &str,
    password: &str,
) -> HttpResponse {
    let credentials = format!("Basic {}", BASE64.encode(format!("{user}:{password}")));
    whole(
        addr,
        method,
        path,
        "application/json",
        Some(credentials),
        body,
    )
}

/// Starts a POST whose response streams (a watch, a keep-alive).
pub fn stream(addr: &str, path: &str, body: &str) -> HttpStream {
    stream_request(addr, "POST", path, body)
}

/// Starts a request whose response streams (a v3 watch, a v2 streaming wait).
pub fn stream_request(addr: &str, method: &str, path: &str, body: &str) -> HttpStream {
    let sent = send(
        addr.to_string(),
        method.to_string(),
        path.to_string(),
        "application/json",
        None,
        body.to_string(),
    );
    let response = block(sent).unwrap_or_else(|| panic!("{method} {path}: no answer"));
    HttpStream {
        status: response.status().as_u16(),
        body: Some(response.into_body()),
        pending: String::new(),
    }
}

impl HttpStream {
    /// The next line of the body, parsed as JSON; None at its end.
    pub fn next_json(&mut self) -> Option<serde_json::Value> {
        loop {
            if let Some(i) = self.pending.find('\n') {
                let line: String = self.pending.drain(..=i).collect();
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                return Some(
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")),
                );
            }
            let mut body = self.body.take()?;
            let (body, frame) = block(async move {
                let frame = body.frame().await;
                (body, frame)
            })?;
            let Ok(frame) = frame? else {
                return None;
            };
            self.body = Some(body);
            if let Some(data) = frame.data_ref() {
                self.pending.push_str(&String::from_utf8_lossy(data));
            }
        }
    }
}

/// Standard base64 with padding, as grpc-gateway writes bytes.
pub fn b64(data: &str) -> String {
    BASE64.encode(data)
}
