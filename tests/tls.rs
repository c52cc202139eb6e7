//! TLS between clients and members and between members, with certificates
//! the tests make (rcgen): client certificates under --client-cert-auth
//! (and their common name as the user once auth is on), and a member whose
//! peer certificates another CA signed, which cannot join.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::free_port;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA and the certificates it signed, as PEM files in `dir`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("pki dir");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
        Pki { ca, dir }
    }

    fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    /// A certificate for 127.0.0.1 with common name `cn`, good for both
    /// ends of a connection; returns the certificate and key files.
    fn issue(&self, file: &str, cn: &str) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let cert_file = self.dir.join(format!("{file}.pem"));
        let key_file = self.dir.join(format!("{file}-key.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        (
            cert_file.display().to_string(),
            key_file.display().to_string(),
        )
    }
}

/// A member process, killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(dir: &Path, name: &str, args: &[String]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["--name", name])
            .arg("--data-dir")
            .arg(dir.join(name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start cairn");
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the ready line; false if the process exited or `limit`
    /// passed first.
    fn ready_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains("ready to serve client requests") {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// A one-member cluster serving clients over TLS with --client-cert-auth.
fn secure_member(dir: &Path, pki: &Pki) -> (Proc, String) {
    secure_member_with(dir, pki, &[])
}

fn secure_member_with(dir: &Path, pki: &Pki, extra: &[&str]) -> (Proc, String) {
    let (cert, key) = pki.issue("server", "server");
    let client = format!("https://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let mut args = strings(&[
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("m0={peer}"),
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--trusted-ca-file",
        &pki.ca(),
        "--client-cert-auth",
    ]);
    args.push("--bcrypt-cost=4".into());
    args.extend(strings(extra));
    let mut member = Proc::start(dir, "m0", &args);
    assert!(
        member.ready_within(Duration::from_secs(30)),
        "{}",
        member.log()
    );
    (member, client)
}

/// etcdctl over TLS, with a client certificate when `cert` is given.
fn etcdctl(endpoint: &str, ca: &str, cert: Option<&(String, String)>, args: &[&str]) -> Output {
    let mut tls = vec![format!("--cacert={ca}")];
    if let Some((cert, key)) = cert {
        tls.push(format!("--cert={cert}"));
        tls.push(format!("--key={key}"));
    }
    let mut all: Vec<&str> = tls.iter().map(String::as_str).collect();
    all.extend(["--dial-timeout=2s", "--command-timeout=3s"]);
    all.extend_from_slice(args);
    common::etcdctl(endpoint, &all, Some(""))
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_client_without_a_certificate_is_refused_under_client_cert_auth() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "main");
    let (_member, endpoint) = secure_member(dir.path(), &pki);
    let client = pki.issue("client", "client");
    assert_eq!(
        ok(etcdctl(
            &endpoint,
            &pki.ca(),
            Some(&client),
            &["put", "k", "v"]
        )),
        "OK\n"
    );
    let refused = etcdctl(&endpoint, &pki.ca(), None, &["get", "k"]);
    assert!(!refused.status.success(), "{refused:?}");
    // A certificate another CA signed is refused too.
    let other = Pki::new(dir.path(), "other");
    let stranger = other.issue("stranger", "client");
    let refused = etcdctl(&endpoint, &pki.ca(), Some(&stranger), &["get", "k"]);
    assert!(!refused.status.success(), "{refused:?}");
}

#[test]
fn the_certificates_common_name_is_the_user_once_auth_is_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "main");
    let (_member, endpoint) = secure_member(dir.path(), &pki);
    let admin = pki.issue("admin", "root");
    let alice = pki.issue("alice", "alice");
    let run =
        |cert: &(String, String), args: &[&str]| etcdctl(&endpoint, &pki.ca(), Some(cert), args);
    let add_root = common::etcdctl(
        &endpoint,
        &[
            &format!("--cacert={}", pki.ca()),
            &format!("--cert={}", admin.0),
            &format!("--key={}", admin.1),
            "user",
            "add",
            "root",
            "--interactive=false",
        ],
        Some("secret\n"),
    );
    ok(add_root);
    ok(run(&admin, &["user", "grant-role", "root", "root"]));
    ok(run(&admin, &["user", "add", "alice", "--no-password"]));
    ok(run(&admin, &["role", "add", "app"]));
    ok(run(
        &admin,
        &[
            "role",
            "grant-permission",
            "app",
            "readwrite",
            "/app/",
            "--prefix=true",
        ],
    ));
    ok(run(&admin, &["user", "grant-role", "alice", "app"]));
    assert_eq!(
        ok(run(&admin, &["auth", "enable"])),
        "Authentication Enabled\n"
    );

    // No user name or password given: the certificate says who calls.
    assert_eq!(ok(run(&alice, &["put", "/app/x", "1"])), "OK\n");
    let denied = run(&alice, &["put", "/other/x", "1"]);
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("etcdserver: permission denied"),
        "{denied:?}"
    );
    // root's certificate has the root role.
    assert_eq!(ok(run(&admin, &["put", "/other/x", "1"])), "OK\n");
    // A password user still authenticates by password over the same TLS.
    let by_password = run(&alice, &["--user=root:secret", "get", "/other/x"]);
    assert_eq!(ok(by_password), "/other/x\n1\n");
}

#[test]
fn a_member_with_the_wrong_peer_ca_cannot_join() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = Pki::new(dir.path(), "good");
    let bad = Pki::new(dir.path(), "bad");
    let (cert_a, key_a) = good.issue("a", "a");
    let (cert_b, key_b) = bad.issue("b", "b");
    let client_a = format!("http://127.0.0.1:{}", free_port());
    let peer_a = format!("https://127.0.0.1:{}", free_port());
    let client_b = format!("http://127.0.0.1:{}", free_port());
    let peer_b = format!("https://127.0.0.1:{}", free_port());
    let peer_flags = |cert: &str, key: &str, ca: &str| {
        strings(&[
            "--peer-cert-file",
            cert,
            "--peer-key-file",
            key,
            "--peer-trusted-ca-file",
            ca,
            "--peer-client-cert-auth",
        ])
    };
    let mut args_a = strings(&[
        "--listen-client-urls",
        &client_a,
        "--advertise-client-urls",
        &client_a,
        "--listen-peer-urls",
        &peer_a,
        "--initial-advertise-peer-urls",
        &peer_a,
        "--initial-cluster",
        &format!("a={peer_a}"),
    ]);
    args_a.extend(peer_flags(&cert_a, &key_a, &good.ca()));
    let mut a = Proc::start(dir.path(), "a", &args_a);
    assert!(a.ready_within(Duration::from_secs(30)), "{}", a.log());
    // As a learner, so that the cluster keeps its quorum without it.
    let endpoint_a = client_a.trim_start_matches("http://");
    let added = common::etcdctl(
        endpoint_a,
        &[
            "member",
            "add",
            "b",
            &format!("--peer-urls={peer_b}"),
            "--learner",
        ],
        None,
    );
    ok(added);

    let mut args_b = strings(&[
        "--listen-client-urls",
        &client_b,
        "--advertise-client-urls",
        &client_b,
        "--listen-peer-urls",
        &peer_b,
        "--initial-advertise-peer-urls",
        &peer_b,
        "--initial-cluster",
        &format!("a={peer_a},b={peer_b}"),
        "--initial-cluster-state",
        "existing",
    ]);
    args_b.extend(peer_flags(&cert_b, &key_b, &bad.ca()));
    let mut b = Proc::start(dir.path(), "b", &args_b);
    assert!(!b.ready_within(Duration::from_secs(8)), "{}", b.log());
    assert!(b.log().contains("UnknownIssuer"), "{}", b.log());
    assert!(
        a.log().contains("peer TLS handshake failed"),
        "a never refused b: {}",
        a.log()
    );
    // b never published itself: the cluster still knows it by URL only.
    let members = ok(common::etcdctl(endpoint_a, &["member", "list"], None));
    assert!(members.contains(", unstarted, ,"), "{members}");
    assert_eq!(
        ok(common::etcdctl(endpoint_a, &["put", "k", "v"], None)),
        "OK\n"
    );
}

#[test]
fn metrics_are_served_over_tls_with_the_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "ca");
    let metrics = format!("https://127.0.0.1:{}", free_port());
    let (_member, _) = secure_member_with(dir.path(), &pki, &["--listen-metrics-urls", &metrics]);
    let client = pki.issue("client", "client");
    let curl = |cert: Option<&(String, String)>| {
        let mut command = std::process::Command::new("curl");
        command.args(["-sS", "--max-time", "5", "--cacert", &pki.ca()]);
        if let Some((cert, key)) = cert {
            command.args(["--cert", cert, "--key", key]);
        }
        command
            .arg(format!("{metrics}/metrics"))
            .output()
            .expect("curl")
    };
    let served = curl(Some(&client));
    let body = String::from_utf8_lossy(&served.stdout);
    assert!(
        served.status.success() && body.contains("etcd_server_has_leader 1"),
        "{served:?}"
    );
    // --client-cert-auth holds there too.
    assert!(
        !curl(None).status.success(),
        "served without a client certificate"
    );
}
