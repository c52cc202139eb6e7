//! `--namespace`: every key a client names gets the prefix on the way up, and
//! loses it on the way back (responses, watch events, error messages), as
//! etcd's `clientv3/namespace` does for its proxy.

use bytes::{Bytes, BytesMut};
use cairn_api::error;
use cairn_api::etcdserverpb::request_op::Request as Op;
use cairn_api::etcdserverpb::response_op::Response as OpResponse;
use cairn_api::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, TxnRequest, TxnResponse,
};
use cairn_api::mvccpb::KeyValue;
use tonic::Status;

#[derive(Clone, Debug, Default)]
pub struct Namespace {
    prefix: Bytes,
}

impl Namespace {
    pub fn new(prefix: &str) -> Namespace {
        Namespace {
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.prefix.is_empty()
    }

    pub fn key(&self, key: &[u8]) -> Bytes {
        if self.prefix.is_empty() {
            return Bytes::copy_from_slice(key);
        }
        let mut out = BytesMut::with_capacity(self.prefix.len() + key.len());
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(key);
        out.freeze()
    }

    /// etcd's `prefixInterval`: `[key, end)` inside the namespace. An end of
    /// `\0` ("every key from key") becomes the end of the namespace.
    pub fn interval(&self, key: &[u8], end: &[u8]) -> (Bytes, Bytes) {
        if self.prefix.is_empty() {
            return (Bytes::copy_from_slice(key), Bytes::copy_from_slice(end));
        }
        let end = match end {
            [] => Bytes::new(),
            [0] => prefix_end(&self.prefix),
            end => self.key(end),
        };
        (self.key(key), end)
    }

    pub fn strip(&self, key: &mut Bytes) {
        if !self.prefix.is_empty() && key.starts_with(&self.prefix) {
            *key = key.slice(self.prefix.len()..);
        }
    }

    /// A key of the namespace without its prefix; `None` for a key outside.
    pub fn inside(&self, key: &Bytes) -> Option<Bytes> {
        key.starts_with(&self.prefix)
            .then(|| key.slice(self.prefix.len()..))
    }

    pub fn strip_kv(&self, kv: &mut KeyValue) {
        self.strip(&mut kv.key);
    }

    /// Error messages may quote keys: they lose the prefix too.
    pub fn status(&self, status: Status) -> Status {
        if self.prefix.is_empty() {
            return status;
        }
        let Ok(prefix) = std::str::from_utf8(&self.prefix) else {
            return status;
        };
        if !status.message().contains(prefix) {
            return status;
        }
        Status::with_metadata(
            status.code(),
            status.message().replace(prefix, ""),
            status.metadata().clone(),
        )
    }

    /// The empty key means "no key" to etcd; with a prefix it would quietly
    /// become the prefix itself, so it is refused here as etcd's namespace
    /// client refuses it.
    fn check_key(&self, key: &[u8], end: &[u8]) -> Result<(), Status> {
        if !self.prefix.is_empty() && key.is_empty() && end.is_empty() {
            return Err(error::EMPTY_KEY.status());
        }
        Ok(())
    }

    pub fn range(&self, r: &mut RangeRequest) -> Result<(), Status> {
        self.check_key(&r.key, &r.range_end)?;
        (r.key, r.range_end) = self.interval(&r.key, &r.range_end);
        Ok(())
    }

    pub fn put(&self, r: &mut PutRequest) -> Result<(), Status> {
        self.check_key(&r.key, &[])?;
        r.key = self.key(&r.key);
        Ok(())
    }

    pub fn delete(&self, r: &mut DeleteRangeRequest) -> Result<(), Status> {
        self.check_key(&r.key, &r.range_end)?;
        (r.key, r.range_end) = self.interval(&r.key, &r.range_end);
        Ok(())
    }

    pub fn txn(&self, r: &mut TxnRequest) -> Result<(), Status> {
        if self.prefix.is_empty() {
            return Ok(());
        }
        for compare in &mut r.compare {
            self.compare(compare)?;
        }
        for op in r.success.iter_mut().chain(r.failure.iter_mut()) {
            match &mut op.request {
                Some(Op::RequestRange(r)) => self.range(r)?,
                Some(Op::RequestPut(r)) => self.put(r)?,
                Some(Op::RequestDeleteRange(r)) => self.delete(r)?,
                Some(Op::RequestTxn(r)) => self.txn(r)?,
                None => {}
            }
        }
        Ok(())
    }

    fn compare(&self, c: &mut Compare) -> Result<(), Status> {
        self.check_key(&c.key, &c.range_end)?;
        (c.key, c.range_end) = self.interval(&c.key, &c.range_end);
        Ok(())
    }

    pub fn range_response(&self, r: &mut RangeResponse) {
        r.kvs.iter_mut().for_each(|kv| self.strip_kv(kv));
    }

    pub fn put_response(&self, r: &mut PutResponse) {
        r.prev_kv.iter_mut().for_each(|kv| self.strip_kv(kv));
    }

    pub fn delete_response(&self, r: &mut DeleteRangeResponse) {
        r.prev_kvs.iter_mut().for_each(|kv| self.strip_kv(kv));
    }

    pub fn txn_response(&self, r: &mut TxnResponse) {
        if self.prefix.is_empty() {
            return;
        }
        for op in &mut r.responses {
            match &mut op.response {
                Some(OpResponse::ResponseRange(r)) => self.range_response(r),
                Some(OpResponse::ResponsePut(r)) => self.put_response(r),
                Some(OpResponse::ResponseDeleteRange(r)) => self.delete_response(r),
                Some(OpResponse::ResponseTxn(r)) => self.txn_response(r),
                None => {}
            }
        }
    }
}

/// The first key after every key that starts with `prefix`; `\0` when there
/// is none (a prefix of all 0xff bytes).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return end.into();
        }
        end.pop();
    }
    Bytes::from_static(&[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_follow_etcd() {
        let ns = Namespace::new("a/");
        assert_eq!(ns.interval(b"k", b""), (Bytes::from("a/k"), Bytes::new()));
        assert_eq!(
            ns.interval(b"k", b"\0"),
            (Bytes::from("a/k"), Bytes::from("a0"))
        );
        assert_eq!(
            ns.interval(b"k", b"m"),
            (Bytes::from("a/k"), Bytes::from("a/m"))
        );
        assert_eq!(prefix_end(b"\xff\xff"), Bytes::from_static(&[0]));
        assert_eq!(prefix_end(b"a\xff"), Bytes::from("b"));
    }

    #[test]
    fn strips_only_its_own_prefix() {
        let ns = Namespace::new("a/");
        let mut key = Bytes::from("a/x");
        ns.strip(&mut key);
        assert_eq!(key, Bytes::from("x"));
        assert_eq!(ns.inside(&Bytes::from("b/x")), None);
    }

    #[test]
    fn empty_key_is_refused_inside_a_namespace() {
        let ns = Namespace::new("a/");
        let mut put = PutRequest::default();
        assert_eq!(
            ns.put(&mut put).map_err(|s| s.message().to_owned()),
            Err("etcdserver: key is not provided".to_owned())
        );
        let mut range = RangeRequest {
            range_end: Bytes::from_static(&[0]),
            ..Default::default()
        };
        assert!(ns.range(&mut range).is_ok());
        assert_eq!(range.key, Bytes::from("a/"));
        assert_eq!(range.range_end, Bytes::from("a0"));
    }

    #[test]
    fn error_messages_lose_the_prefix() {
        let ns = Namespace::new("pfx/");
        let status = ns.status(Status::invalid_argument("bad key pfx/k"));
        assert_eq!(status.message(), "bad key k");
    }
}
