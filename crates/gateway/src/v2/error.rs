//! etcd's v2 errors: codes, messages and HTTP statuses, and the JSON
//! answers that carry them.

use http::{Response, StatusCode};
use serde::Serialize;
use tonic::Status;

use crate::{Body, full};

/// etcd's v2 errors.
#[derive(Debug)]
pub(super) struct V2Error {
    pub(super) code: u32,
    pub(super) cause: String,
    pub(super) index: i64,
}

impl V2Error {
    pub(super) fn new(code: u32, cause: impl Into<String>, index: i64) -> Self {
        V2Error {
            code,
            cause: cause.into(),
            index,
        }
    }

    fn message(&self) -> &'static str {
        match self.code {
            100 => "Key not found",
            101 => "Compare failed",
            102 => "Not a file",
            104 => "Not a directory",
            105 => "Key already exists",
            107 => "Root is read only",
            108 => "Directory not empty",
            201 => "PrevValue is Required in POST form",
            202 => "The given TTL in POST form is not a number",
            203 => "The given index in POST form is not a number",
            209 => "Invalid field",
            211 => "Value provided on refresh",
            212 => "A TTL must be provided on refresh",
            110 => "The request requires user authentication",
            300 => "Raft Internal Error",
            401 => "The event in requested index is outdated and cleared",
            _ => "Internal error",
        }
    }

    fn status(&self) -> StatusCode {
        match self.code {
            100 => StatusCode::NOT_FOUND,
            102 | 108 => StatusCode::FORBIDDEN,
            101 | 105 => StatusCode::PRECONDITION_FAILED,
            110 => StatusCode::UNAUTHORIZED,
            300 => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub(super) fn response(&self) -> Response<Body> {
        #[derive(Serialize)]
        struct ErrorBody<'a> {
            #[serde(rename = "errorCode")]
            error_code: u32,
            message: &'a str,
            cause: &'a str,
            index: i64,
        }
        let body = ErrorBody {
            error_code: self.code,
            message: self.message(),
            cause: &self.cause,
            index: self.index,
        };
        let mut json = serde_json::to_vec(&body).unwrap_or_default();
        json.push(b'\n');
        v2_response(self.status(), json, self.index)
    }
}

pub(super) fn internal(status: Status) -> V2Error {
    let denied = matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    ) || status.message().contains("user name is empty");
    if denied {
        return V2Error::new(110, "Insufficient credentials", 0);
    }
    V2Error::new(300, status.message().to_string(), 0)
}

pub(super) fn v2_response(status: StatusCode, json: Vec<u8>, index: i64) -> Response<Body> {
    let mut response = Response::new(full(json));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert("X-Etcd-Index", http::HeaderValue::from(index.max(0)));
    response
}
