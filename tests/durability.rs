//! kill -9 a member in the middle of a stream of acknowledged puts: after a
//! restart every acknowledged put is there, and revisions go on with no gap
//! or repeat.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Member;
use etcd_client::{Client, GetOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_kill_9() {
    let mut m = Member::start();
    let acked: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let endpoint = m.endpoint();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let Ok(mut c) = Client::connect([endpoint], None).await else {
                return;
            };
            for i in 0.. {
                let key = format!("w{w}/{i:06}");
                match c.put(key.as_str(), format!("v{i}"), None).await {
                    Ok(resp) => {
                        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                        acked.lock().expect("lock").insert(key, rev);
                    }
                    Err(_) => return, // the member is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    m.kill();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 50,
        "the load wrote something: {}",
        acked.len()
    );

    m.spawn(&[]);
    let mut c = Client::connect([m.endpoint()], None)
        .await
        .expect("connect");
    let all = c
        .get("w", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let stored: BTreeMap<String, i64> = all
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.mod_revision(),
            )
        })
        .collect();
    for (key, rev) in &acked {
        assert_eq!(
            stored.get(key),
            Some(rev),
            "acknowledged put of {key} at revision {rev}"
        );
    }
    // Each put wrote its own key, so the stored revisions are exactly 2..=current.
    let current = all.header().expect("header").revision();
    let mut revisions: Vec<i64> = stored.values().copied().collect();
    revisions.sort_unstable();
    assert_eq!(
        revisions,
        (2..=current).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    let next = c.put("after", "restart", None).await.expect("put");
    assert_eq!(next.header().expect("header").revision(), current + 1);
}
