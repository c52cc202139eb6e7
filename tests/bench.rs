//! cairn-bench against a real member: tiny loads of every benchmark, read
//! back as the JSON report, and the keys the put benchmark wrote.

mod common;

use cairn_api::etcdserverpb::RangeRequest;
use cairn_api::etcdserverpb::kv_client::KvClient;
use common::Member;
use serde_json::Value;

async fn bench(member: &Member, args: &[&str]) -> Value {
    let endpoints = format!("--endpoints={}", member.endpoint());
    let mut argv = vec!["cairn-bench", endpoints.as_str(), "--json"];
    argv.extend_from_slice(args);
    let cli = cairn_bench::Cli::from_args(&argv).expect("valid arguments");
    let outcome = cairn_bench::run(&cli).await.expect("benchmark runs");
    let mut out = Vec::new();
    cairn_bench::write(&cli, &outcome, &mut out).expect("report written");
    serde_json::from_slice(&out).expect("one JSON object")
}

fn assert_clean(report: &Value, mode: &str, count: u64) {
    assert_eq!(report["mode"], mode, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["count"], count, "{report}");
    assert!(report["rps"].as_f64().is_some_and(|r| r > 0.0), "{report}");
    let p50 = report["p50"].as_f64().expect("p50");
    let p99 = report["p99"].as_f64().expect("p99");
    let max = report["max"].as_f64().expect("max");
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_writes_every_key_of_its_key_space() {
    let member = Member::start();
    let report = bench(
        &member,
        &[
            "--clients=8",
            "--conns=2",
            "put",
            "--total=200",
            "--key-space-size=200",
            "--sequential-keys",
            "--val-size=64",
        ],
    )
    .await;
    assert_clean(&report, "put", 200);
    assert_eq!(report["total"], 200);
    assert_eq!(report["clients"], 8);

    let mut kv = KvClient::connect(format!("http://{}", member.endpoint()))
        .await
        .expect("connect");
    // Keys are binary (etcd's varint keys); "\0" to "\0" is every key.
    let all = kv
        .range(RangeRequest {
            key: vec![0].into(),
            range_end: vec![0].into(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(all.count, 200);
    assert!(
        all.kvs
            .iter()
            .all(|kv| kv.value.len() == 64 && kv.key.len() == 8)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_benchmark_runs_cleanly() {
    let member = Member::start();
    member.etcdctl_ok(&["put", "foo", "bar"]);
    let cases: [(&[&str], &str, u64); 5] = [
        (
            &["--clients=4", "range", "foo", "--total=200"],
            "range-l",
            200,
        ),
        (
            &[
                "--clients=4",
                "range",
                "foo",
                "--consistency=s",
                "--total=200",
            ],
            "range-s",
            200,
        ),
        (
            &[
                "--clients=4",
                "txn-put",
                "--total=200",
                "--key-space-size=50",
                "--txn-ops=3",
            ],
            "txn-put",
            200,
        ),
        (
            &["--clients=4", "lease-keepalive", "--total=200"],
            "lease-keepalive",
            200,
        ),
        (
            &["--clients=3", "watch-latency", "--total=50", "--put-rate=0"],
            "watch-latency",
            150,
        ),
    ];
    for (args, mode, count) in cases {
        assert_clean(&bench(&member, args).await, mode, count);
    }

    // 4 streams x 5 watchers over 2 keys (10 watchers each), 20 puts (10
    // per key): 200 events.
    let watch = bench(
        &member,
        &[
            "--clients=2",
            "watch",
            "--streams=4",
            "--watch-per-stream=5",
            "--watched-key-total=2",
            "--key-space-size=2",
            "--sequential-keys",
            "--put-total=20",
        ],
    )
    .await;
    assert_clean(&watch, "watch", 200);
    assert_eq!(watch["creation"]["count"], 20, "{watch}");
    assert_eq!(watch["creation"]["errors"], 0, "{watch}");
}
