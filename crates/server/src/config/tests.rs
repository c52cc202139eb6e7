use std::path::PathBuf;
use std::time::Duration;

use super::parse::parse_auto_compaction;
use super::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<ServerConfig> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let args = std::iter::once("cairn").chain(args.iter().copied());
    match parse(args, &env)? {
        Invocation::Run(c) => Ok(*c),
        Invocation::Version => anyhow::bail!("version"),
    }
}

#[test]
fn etcd_defaults() -> anyhow::Result<()> {
    let c = run(&[], &[])?;
    assert_eq!(c.name, "default");
    assert_eq!(c.data_dir, PathBuf::from("default.etcd"));
    assert_eq!(c.listen_client_urls, vec!["http://localhost:2379"]);
    assert_eq!(c.max_request_bytes, 1572864);
    assert_eq!(c.max_txn_ops, 128);
    assert_eq!(c.snapshot_count, 100000);
    assert_eq!(c.auto_compaction, AutoCompaction::Off);
    assert_eq!(c.initial_cluster_token, "etcd-cluster");
    Ok(())
}

#[test]
fn disk_reserve() -> anyhow::Result<()> {
    assert_eq!(run(&[], &[])?.disk_reserve, DiskReserve::Auto);
    let bytes = run(&["--disk-reserve-bytes", "8388608"], &[])?;
    assert_eq!(bytes.disk_reserve, DiskReserve::Bytes(8 << 20));
    let off = run(&["--disk-reserve-bytes=-1"], &[])?;
    assert_eq!(off.disk_reserve, DiskReserve::Off);
    assert!(run(&["--disk-reserve-bytes", "lots"], &[]).is_err());
    Ok(())
}

#[test]
fn flags_beat_environment_beats_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("etcd.yaml");
    std::fs::write(
        &file,
        "name: from-file\nmax-txn-ops: 7\nsnapshot-count: 9\n",
    )?;
    let file = file.display().to_string();
    let c = run(
        &[
            "--config-file",
            &file,
            "--name=from-flag",
            "--initial-cluster",
            "from-flag=http://localhost:2380",
        ],
        &[
            ("ETCD_NAME", "from-env"),
            ("ETCD_MAX_TXN_OPS", "8"),
            ("ETCDCTL_API", "3"),
        ],
    )?;
    assert_eq!(c.name, "from-flag");
    assert_eq!(c.data_dir, PathBuf::from("from-flag.etcd"));
    assert_eq!(c.max_txn_ops, 8);
    assert_eq!(c.snapshot_count, 9);
    Ok(())
}

#[test]
fn later_flags_are_refused_clearly() {
    let err = run(&["--peer-crl-file", "x.pem"], &[])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("--peer-crl-file") && err.contains("CRL"),
        "{err}"
    );
    let err = run(&["--wal-dir", "/tmp/wal"], &[])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("wal-dir"), "{err}");
    assert!(run(&["--enable-v2"], &[]).is_ok());
}

fn refusal(args: &[&str]) -> String {
    run(args, &[])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

#[test]
fn client_tls_flags() -> anyhow::Result<()> {
    let https = "--listen-client-urls=https://127.0.0.1:2379";
    assert_eq!(
        refusal(&[https]),
        "TLS key/cert (--cert-file, --key-file) must be provided for client url https://127.0.0.1:2379 with HTTPS scheme"
    );
    assert!(run(&[https, "--auto-tls"], &[])?.client_tls.auto_tls);
    let c = run(
        &[
            https,
            "--cert-file=s.pem",
            "--key-file=s-key.pem",
            "--trusted-ca-file=ca.pem",
            "--client-cert-auth",
            "--client-crl-file=revoke.crl",
        ],
        &[(
            "ETCD_CIPHER_SUITES",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256",
        )],
    )?;
    assert_eq!(c.client_tls.cert_file, "s.pem");
    assert_eq!(c.client_tls.key_file, "s-key.pem");
    assert_eq!(c.client_tls.trusted_ca_file, "ca.pem");
    assert!(c.client_tls.client_cert_auth);
    assert_eq!(c.client_tls.crl_file, "revoke.crl");
    assert_eq!(
        c.cipher_suites,
        [
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "TLS_AES_128_GCM_SHA256"
        ]
    );
    assert_eq!(
        refusal(&["--cipher-suites=TLS_NOPE"]),
        "unexpected TLS cipher suite \"TLS_NOPE\""
    );
    let twice = run(
        &[
            "--client-cert-auth=false",
            "--client-cert-auth",
            "--name=a",
            "--name=b",
            "--initial-cluster=b=http://localhost:2380",
        ],
        &[],
    )?;
    assert!(twice.client_tls.client_cert_auth);
    assert_eq!(twice.name, "b");
    // Certificates with an http URL: served plain, as etcd does.
    run(&["--cert-file=s.pem", "--key-file=s-key.pem"], &[])?;
    assert!(refusal(&["--cert-file=s.pem"]).contains("go together"));
    assert!(
        refusal(&[
            "--cert-file=s.pem",
            "--key-file=k.pem",
            "--client-cert-auth"
        ])
        .contains("--trusted-ca-file")
    );
    assert!(
        refusal(&["--peer-auto-tls", "--cipher-suites=TLS_AES_128_GCM_SHA256"])
            .contains("--cipher-suites")
    );
    Ok(())
}

#[test]
fn auto_compaction_retention() -> anyhow::Result<()> {
    assert_eq!(
        parse_auto_compaction("periodic", "1")?,
        AutoCompaction::Periodic(Duration::from_secs(3600))
    );
    assert_eq!(
        parse_auto_compaction("periodic", "1h30m")?,
        AutoCompaction::Periodic(Duration::from_secs(5400))
    );
    assert_eq!(
        parse_auto_compaction("revision", "1000")?,
        AutoCompaction::Revision(1000)
    );
    assert_eq!(parse_auto_compaction("revision", "0")?, AutoCompaction::Off);
    assert!(parse_auto_compaction("weekly", "3").is_err());
    Ok(())
}

#[test]
fn unix_socket_urls_as_etcd_takes_them() -> anyhow::Result<()> {
    let unix = run(
        &[
            "--name=e1",
            "--listen-peer-urls=unix://etcd.unix:1",
            "--initial-advertise-peer-urls=unix://etcd.unix:1",
            "--initial-cluster=e1=unix://etcd.unix:1",
            "--listen-client-urls=unix://client.unix:2,unixs://client.unix:2",
            "--advertise-client-urls=unix://client.unix:2",
            "--auto-tls",
        ],
        &[],
    )?;
    assert_eq!(unix.listen_peer_urls, ["unix://etcd.unix:1"]);
    assert_eq!(
        refusal(&["--listen-client-urls=unixs://client.unix:2"]),
        "TLS key/cert (--cert-file, --key-file) must be provided for client url unixs://client.unix:2 with HTTPS scheme"
    );
    assert!(
        refusal(&[
            "--listen-peer-urls=unixs://etcd.unix:1",
            "--initial-advertise-peer-urls=unixs://etcd.unix:1",
            "--initial-cluster=default=unixs://etcd.unix:1",
        ])
        .contains("--peer-auto-tls")
    );
    assert_eq!(
        refusal(&["--listen-peer-urls=tcp://127.0.0.1:2380"]),
        "invalid value \"tcp://127.0.0.1:2380\" for --listen-peer-urls: URL scheme must be http, https, unix, or unixs: tcp://127.0.0.1:2380"
    );
    assert!(refusal(&["--initial-cluster=default=ftp://h:1"]).contains("--initial-cluster"));
    Ok(())
}
