//! The member's side of auth (`cairn-auth`): what a gRPC request presents
//! as credentials, and auth's errors as gRPC statuses.

use std::future::Future;

use cairn_auth::{Auth, AuthError, Caller, Credentials, V2Guest};
use tonic::{Request, Status};

use crate::client_tls::ClientTlsInfo;

/// What `request` presents: etcd's gRPC clients send `token`, its gateway
/// forwards the HTTP Authorization header as `authorization`; the client
/// listener attaches the TLS identity and the v2 API marks its guests.
pub fn credentials<T>(request: &Request<T>) -> Credentials {
    let metadata = request.metadata();
    let token = metadata
        .get("token")
        .or_else(|| metadata.get("authorization"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let common_name = request
        .extensions()
        .get::<ClientTlsInfo>()
        .and_then(|tls| tls.common_name.clone());
    let v2_guest = request.extensions().get::<V2Guest>().is_some();
    Credentials {
        token,
        common_name,
        v2_guest,
    }
}

/// Auth's checks on the caller of a gRPC request.
pub trait RequestAuth {
    /// Resolves the caller of `request`.
    fn caller_of<T>(
        &self,
        request: &Request<T>,
    ) -> impl Future<Output = Result<Caller, Status>> + Send;

    /// Resolves the caller of `request` and checks it is an admin.
    fn admin_of<T>(&self, request: &Request<T>) -> impl Future<Output = Result<(), Status>> + Send;
}

impl RequestAuth for Auth {
    fn caller_of<T>(
        &self,
        request: &Request<T>,
    ) -> impl Future<Output = Result<Caller, Status>> + Send {
        let credentials = credentials(request);
        async move { Ok(self.caller(&credentials).await?) }
    }

    fn admin_of<T>(&self, request: &Request<T>) -> impl Future<Output = Result<(), Status>> + Send {
        let credentials = credentials(request);
        async move {
            let caller = self.caller(&credentials).await?;
            Ok(self.check_admin(&caller)?)
        }
    }
}

/// etcd's errors as etcd sends them; this member's own failures as
/// `Internal`.
pub fn status(e: AuthError) -> Status {
    match e {
        AuthError::Etcd(e) => e.status(),
        other => Status::internal(other.to_string()),
    }
}
