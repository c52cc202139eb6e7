//! A minimal HTTP/1.1 client for the gateway tests: one request per
//! connection, chunked or sized bodies, and streamed bodies read line by
//! line as they arrive.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

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
    reader: BufReader<TcpStream>,
    chunked: bool,
    pending: String,
}

fn send(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> TcpStream {
    send_with(addr, method, path, content_type, "", body)
}

fn send_with(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).expect("send head");
    tcp.write_all(body).expect("send body");
    tcp
}

fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    (status, headers)
}

/// One request; the whole response.
pub fn request(addr: &str, method: &str, path: &str, body: &str) -> HttpResponse {
    request_as(addr, method, path, "application/json", body)
}

/// A form request, as curl -d sends it.
pub fn form(addr: &str, method: &str, path: &str, body: &str) -> HttpResponse {
    request_as(
        addr,
        method,
        path,
        "application/x-www-form-urlencoded",
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
    let credentials = format!(
        "Authorization: Basic {}\r\n",
        b64(&format!("{user}:{password}"))
    );
    read_response(send_with(
        addr,
        method,
        path,
        "application/json",
        &credentials,
        body.as_bytes(),
    ))
}

fn request_as(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> HttpResponse {
    read_response(send(addr, method, path, content_type, body.as_bytes()))
}

fn read_response(tcp: TcpStream) -> HttpResponse {
    let mut reader = BufReader::new(tcp);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend_from_slice(&chunk);
        }
    } else {
        reader.read_to_end(&mut body).expect("body");
    }
    HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    reader.read_line(&mut size).ok()?;
    let size = usize::from_str_radix(size.trim(), 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).ok()?;
    chunk.truncate(size);
    Some(chunk)
}

/// Starts a request whose response streams (a watch, a keep-alive).
pub fn stream(addr: &str, path: &str, body: &str) -> HttpStream {
    let tcp = send(addr, "POST", path, "application/json", body.as_bytes());
    let mut reader = BufReader::new(tcp);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    HttpStream {
        status,
        reader,
        chunked,
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
            let more = if self.chunked {
                read_chunk(&mut self.reader)?
            } else {
                let mut line = String::new();
                if self.reader.read_line(&mut line).ok()? == 0 {
                    return None;
                }
                line.into_bytes()
            };
            self.pending.push_str(&String::from_utf8_lossy(&more));
        }
    }
}

/// Standard base64 with padding, as grpc-gateway writes bytes.
pub fn b64(data: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = data.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
