//! With --shards: what a member tells of the shards, on `/shards` (JSON,
//! on the client and metrics URLs) and per shard on `/metrics`, and
//! `cairn shards [--endpoints URL,...]`, which asks every member given
//! and prints one line per shard: its keys, replicas, leader, term,
//! indexes, revision, key count and size, each from the replica that leads
//! it (else the most advanced one that answered).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use cairn_metrics::ShardSample;
use cairn_shard::ShardId;
use cairn_shard_replica::LocalShard;
use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};

use crate::client_command::ClientCommand;
use crate::shards::Shards;

/// One member's `/shards`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Listing {
    /// The answering member's ID, in hexadecimal as etcdctl prints IDs.
    pub member: String,
    pub shard_count: u32,
    pub shards: Vec<ShardListing>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardListing {
    pub shard: ShardId,
    /// Which keys: hash partitioning, so a residue rather than a range.
    pub keys: String,
    /// The members holding a replica (hexadecimal IDs); empty when every
    /// member does (a data dir sharded before placement).
    pub replicas: Vec<String>,
    pub preferred_leader: Option<String>,
    /// This member's replica, when it holds one.
    pub replica: Option<ReplicaState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaState {
    /// The shard group's leader as this replica knows it ("0": none).
    pub leader: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// The keyspace revision of the shard's last write the replica holds.
    pub revision: i64,
    pub compact_revision: i64,
    pub key_count: u64,
    pub db_total_bytes: u64,
}

/// `member`'s view of every shard.
pub fn listing(member: u64, shards: &Shards) -> Listing {
    let count = shards.count();
    let held: BTreeMap<ShardId, &LocalShard> = shards.held().collect();
    let list = (0..count)
        .map(|shard| {
            let placed = shards.map().and_then(|map| map.shard(shard));
            ShardListing {
                shard,
                keys: format!("xxh3_64(key) % {count} == {shard}"),
                replicas: placed.map_or_else(Vec::new, |p| {
                    p.replicas.iter().map(|id| format!("{id:x}")).collect()
                }),
                preferred_leader: placed.map(|p| format!("{:x}", p.leader)),
                replica: held.get(&shard).map(|local| replica_state(local)),
            }
        })
        .collect();
    Listing {
        member: format!("{member:x}"),
        shard_count: count,
        shards: list,
    }
}

/// Per held shard, for `/metrics`.
pub fn samples(member: u64, shards: &Shards) -> Vec<ShardSample> {
    shards
        .held()
        .map(|(shard, local)| {
            let state = replica_state(local);
            ShardSample {
                shard,
                is_leader: local.node.status().leader == member,
                applied_index: state.applied_index,
                revision: state.revision.max(0) as u64,
                keys: state.key_count,
                db_total_bytes: state.db_total_bytes,
            }
        })
        .collect()
}

fn replica_state(local: &LocalShard) -> ReplicaState {
    let status = local.node.status();
    let store = local.handle.store();
    ReplicaState {
        leader: format!("{:x}", status.leader),
        term: status.term,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        revision: store.current_revision(),
        compact_revision: store.compact_revision(),
        key_count: store.key_count(),
        db_total_bytes: store.size().total,
    }
}

/// `cairn shards [--endpoints URL,...] [--timeout DURATION]`.
pub fn main(args: &[String]) -> ExitCode {
    let Some(command) = ClientCommand::parse("shards", args, Duration::from_secs(5)) else {
        return ExitCode::FAILURE;
    };
    let mut listings = Vec::new();
    for url in &command.endpoints {
        match command.call(fetch(url)) {
            Ok(listing) => listings.push(listing),
            Err(e) => eprintln!("shards: {url}: {e}"),
        }
    }
    if listings.is_empty() {
        return ExitCode::FAILURE;
    }
    print!("{}", table(&listings));
    ExitCode::SUCCESS
}

async fn fetch(url: &str) -> Result<Listing, Box<dyn std::error::Error + Send + Sync>> {
    let uri: http::Uri = format!("{}/shards", url.trim_end_matches('/')).parse()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client.get(uri).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body).trim()).into());
    }
    Ok(serde_json::from_slice(&body)?)
}

/// One line per shard, each from the replica that leads it, else from the
/// one that has applied the most.
pub fn table(listings: &[Listing]) -> String {
    // Ranked by (leads the shard, applied index).
    type Best<'a> = (&'a ShardListing, Option<(&'a ReplicaState, (bool, u64))>);
    let mut best: BTreeMap<ShardId, Best<'_>> = BTreeMap::new();
    for listing in listings {
        for shard in &listing.shards {
            let entry = best.entry(shard.shard).or_insert((shard, None));
            let Some(state) = &shard.replica else {
                continue;
            };
            let rank = (state.leader == listing.member, state.applied_index);
            if entry.1.is_none_or(|(_, known)| rank > known) {
                *entry = (shard, Some((state, rank)));
            }
        }
    }
    let mut out = format!(
        "{:>5}  {:<26}  {:<30}  {:>16}  {:>5}  {:>9}  {:>9}  {:>8}  {:>10}\n",
        "SHARD", "KEYS", "REPLICAS", "LEADER", "TERM", "APPLIED", "REVISION", "KEYCOUNT", "BYTES"
    );
    for (shard, (listing, state)) in best {
        let replicas = if listing.replicas.is_empty() {
            "every member".to_string()
        } else {
            listing.replicas.join(",")
        };
        let (leader, term, applied, revision, keys, bytes) = match state {
            Some((s, _)) => (
                s.leader.clone(),
                s.term.to_string(),
                s.applied_index.to_string(),
                s.revision.to_string(),
                s.key_count.to_string(),
                s.db_total_bytes.to_string(),
            ),
            None => (
                "?".into(),
                "?".into(),
                "?".into(),
                "?".into(),
                "?".into(),
                "?".into(),
            ),
        };
        out.push_str(&format!(
            "{shard:>5}  {:<26}  {replicas:<30}  {leader:>16}  {term:>5}  {applied:>9}  {revision:>9}  {keys:>8}  {bytes:>10}\n",
            listing.keys
        ));
    }
    out
}
