//! Cluster members: as this crate hands them over, and as etcd stores them
//! (its `members` bucket and its conf changes' context).

use crate::Error;

/// A member of the cluster: raft ID plus what clients and peers need to
/// reach it. The member's own registry keeps the same fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: u64,
    /// Empty until the member has started and published itself.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// A member as etcd's membership store keeps it: its JSON field names and
/// order, empty fields left out as Go's `omitempty` does.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct StoredMember {
    pub(crate) id: u64,
    #[serde(rename = "peerURLs", default)]
    pub(crate) peer_urls: Vec<String>,
    #[serde(
        rename = "isLearner",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub(crate) is_learner: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) name: String,
    #[serde(rename = "clientURLs", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) client_urls: Vec<String>,
}

/// `member` as etcd's `members` bucket holds it.
pub(crate) fn member_json(member: &Member) -> String {
    let stored = StoredMember {
        id: member.id,
        peer_urls: member.peer_urls.clone(),
        is_learner: member.is_learner,
        name: member.name.clone(),
        client_urls: member.client_urls.clone(),
    };
    // Strings and numbers only: serializing cannot fail.
    serde_json::to_string(&stored).unwrap_or_default()
}

/// A member from etcd's JSON (its `members` bucket, or a conf change's
/// context).
pub(crate) fn stored_member(json: &[u8]) -> Result<Member, Error> {
    let m: StoredMember =
        serde_json::from_slice(json).map_err(|e| Error::Invalid(format!("member record: {e}")))?;
    Ok(Member {
        id: m.id,
        name: m.name,
        peer_urls: m.peer_urls,
        client_urls: m.client_urls,
        is_learner: m.is_learner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_json_matches_etcds_store() {
        // As etcd 3.4 stores its default member.
        let member = Member {
            id: 0x2e1259d415f2a040,
            name: "default".into(),
            peer_urls: vec!["http://127.0.0.1:23800".into()],
            client_urls: vec!["http://127.0.0.1:23790".into()],
            is_learner: false,
        };
        let json = member_json(&member);
        assert_eq!(
            json,
            r#"{"id":3319814642761637952,"peerURLs":["http://127.0.0.1:23800"],"name":"default","clientURLs":["http://127.0.0.1:23790"]}"#
        );
        assert_eq!(stored_member(json.as_bytes()).expect("read back"), member);
        let learner = Member {
            id: 1,
            peer_urls: vec!["http://a:1".into()],
            is_learner: true,
            ..Default::default()
        };
        assert_eq!(
            member_json(&learner),
            r#"{"id":1,"peerURLs":["http://a:1"],"isLearner":true}"#
        );
        assert!(stored_member(b"{").is_err());
    }
}
