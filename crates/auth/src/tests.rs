//! [`Auth`] over a real mvcc store: changes applied as the apply loop
//! applies them, callers resolved from credentials, writes checked.

use std::time::Duration;

use cairn_api::authpb::Permission;
use cairn_api::authpb::permission::Type as PermType;
use cairn_api::cairnpb::{self, AuthRequest};
use cairn_api::etcdserverpb::{
    AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleGrantPermissionRequest,
    AuthUserGrantRoleRequest, PutRequest,
};
use tempfile::TempDir;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// One member's auth, applying at increasing raft indexes.
struct Member {
    auth: Auth,
    mvcc: Store,
    index: u64,
    _dir: TempDir,
}

impl Member {
    fn open(client_cert_auth: bool) -> Result<Member, Box<dyn std::error::Error>> {
        Member::open_with("simple", client_cert_auth)
    }

    /// A member whose tokens are as `--auth-token` says.
    fn open_with(
        token: &str,
        client_cert_auth: bool,
    ) -> Result<Member, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mvcc = Store::open(dir.path())?;
        let settings = Settings {
            token: token.to_string(),
            token_ttl: Duration::from_secs(300),
            bcrypt_cost: 4,
            client_cert_auth,
        };
        Ok(Member {
            auth: Auth::open(mvcc.clone(), &settings)?,
            mvcc,
            index: 0,
            _dir: dir,
        })
    }

    /// Applies `op` at the next index, as `header`'s user when given.
    fn apply(
        &mut self,
        header: Option<&RequestHeader>,
        op: AuthOp,
    ) -> Result<AuthApplied, Box<dyn std::error::Error>> {
        self.index += 1;
        let mut batch = self.mvcc.write();
        let request = AuthRequest { request: Some(op) };
        let applied = self.auth.apply(&mut batch, header, request, self.index);
        batch.commit(self.index)?;
        Ok(applied?)
    }

    /// root (with the root role) and `alice`, who may read `/app/`; auth on.
    async fn with_users(&mut self) -> TestResult {
        for name in [ROOT_USER, "alice"] {
            let password_hash = self.auth.hash_password(format!("{name}-pw")).await?;
            self.apply(
                None,
                AuthOp::UserAdd(cairnpb::UserAdd {
                    name: name.to_string(),
                    password_hash: password_hash.into(),
                    options: None,
                }),
            )?;
        }
        self.apply(None, grant(ROOT_USER, ROOT_ROLE))?;
        let reader = AuthOp::RoleAdd(AuthRoleAddRequest {
            name: "reader".to_string(),
        });
        self.apply(None, reader)?;
        let perm = Permission {
            perm_type: PermType::Read as i32,
            key: b"/app/".to_vec().into(),
            range_end: b"/app0".to_vec().into(),
        };
        self.apply(
            None,
            AuthOp::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                name: "reader".to_string(),
                perm: Some(perm),
            }),
        )?;
        self.apply(None, grant("alice", "reader"))?;
        self.apply(None, AuthOp::Enable(AuthEnableRequest {}))?;
        Ok(())
    }

    /// A password authentication as the Auth service makes it.
    async fn authenticate(&mut self, name: &str) -> Result<String, Box<dyn std::error::Error>> {
        self.auth.check_password(name, format!("{name}-pw")).await?;
        let op = AuthOp::Authenticate(cairnpb::Authenticate {
            name: name.to_string(),
            simple_token: self.auth.new_simple_token()?,
        });
        let applied = self.apply(None, op)?;
        Ok(self.auth.token_for(applied)?)
    }
}

fn grant(user: &str, role: &str) -> AuthOp {
    AuthOp::UserGrantRole(AuthUserGrantRoleRequest {
        user: user.to_string(),
        role: role.to_string(),
    })
}

fn with_token(token: &str) -> Credentials {
    Credentials {
        token: Some(token.to_string()),
        ..Credentials::default()
    }
}

#[tokio::test]
async fn tokens_name_their_user_until_auth_is_disabled() -> TestResult {
    let mut member = Member::open(false)?;
    member.with_users().await?;
    let wrong = member
        .auth
        .check_password("alice", "nope".to_string())
        .await;
    assert!(matches!(wrong, Err(AuthError::Etcd(e)) if e == etcd::AUTH_FAILED));

    let token = member.authenticate("alice").await?;
    let alice = member.auth.caller(&with_token(&token)).await?;
    assert_eq!(alice.username, "alice");
    member.auth.check(&alice, Access::Read, b"/app/a", b"")?;
    assert_eq!(
        member.auth.check(&alice, Access::Write, b"/app/a", b""),
        Err(etcd::PERMISSION_DENIED)
    );
    assert_eq!(
        member.auth.check_admin(&alice),
        Err(etcd::PERMISSION_DENIED)
    );
    let unknown = member.auth.caller(&with_token("unknown.1")).await;
    assert_eq!(unknown, Err(etcd::INVALID_AUTH_TOKEN));

    // Only root may change the store; the change is in the store's record.
    let disable = AuthOp::Disable(AuthDisableRequest {});
    let refused = member.apply(Some(&alice.header()), disable);
    assert_eq!(
        refused
            .err()
            .and_then(|e| e.downcast_ref::<EtcdError>().copied()),
        Some(etcd::PERMISSION_DENIED)
    );
    let reopened = Auth::open(
        member.mvcc.clone(),
        &Settings {
            token: "simple".to_string(),
            token_ttl: Duration::from_secs(300),
            bcrypt_cost: 4,
            client_cert_auth: false,
        },
    )?;
    assert_eq!(*reopened.store(), *member.auth.store());

    let root = member.authenticate(ROOT_USER).await?;
    let root = member.auth.caller(&with_token(&root)).await?;
    member.apply(Some(&root.header()), AuthOp::Disable(AuthDisableRequest {}))?;
    let nobody = member.auth.caller(&with_token(&token)).await?;
    assert_eq!(nobody.username, "");
    Ok(())
}

#[tokio::test]
async fn certificates_name_users_only_with_client_cert_auth() -> TestResult {
    let by_certificate = Credentials {
        common_name: Some("alice".to_string()),
        ..Credentials::default()
    };
    let v2_guest = Credentials {
        v2_guest: true,
        ..Credentials::default()
    };
    for client_cert_auth in [false, true] {
        let mut member = Member::open(client_cert_auth)?;
        member.with_users().await?;
        let caller = member.auth.caller(&by_certificate).await?;
        let expected = if client_cert_auth { "alice" } else { "" };
        assert_eq!(caller.username, expected);
        let guest = member.auth.caller(&v2_guest).await?;
        assert_eq!(guest.username, V2_GUEST_USER);
    }
    Ok(())
}

#[tokio::test]
async fn applied_writes_are_checked_against_the_store_as_it_is() -> TestResult {
    let mut member = Member::open(false)?;
    member.with_users().await?;
    let token = member.authenticate("alice").await?;
    let alice = member.auth.caller(&with_token(&token)).await?;
    let put = |key: &[u8]| {
        Internal::Put(PutRequest {
            key: key.to_vec().into(),
            ..PutRequest::default()
        })
    };
    let no_lease = |_| Vec::new();
    // Members' own proposals carry no header and pass.
    member
        .auth
        .check_applied(None, &put(b"/app/a"), &no_lease)?;
    assert_eq!(
        member
            .auth
            .check_applied(Some(&alice.header()), &put(b"/app/a"), &no_lease),
        Err(etcd::PERMISSION_DENIED)
    );
    // A txn that only reads alice's keys passes; one that also writes
    // them does not.
    let mut txn = TxnRequest {
        compare: vec![Compare {
            key: b"/app/a".to_vec().into(),
            ..Compare::default()
        }],
        ..TxnRequest::default()
    };
    let reads = Internal::Txn(txn.clone());
    member
        .auth
        .check_applied(Some(&alice.header()), &reads, &no_lease)?;
    txn.failure = vec![RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: b"/app/b".to_vec().into(),
            ..PutRequest::default()
        })),
    }];
    let writes = Internal::Txn(txn);
    assert_eq!(
        member
            .auth
            .check_applied(Some(&alice.header()), &writes, &no_lease),
        Err(etcd::PERMISSION_DENIED)
    );
    Ok(())
}

#[tokio::test]
async fn a_write_checked_before_the_store_changed_fails_as_old_revision() -> TestResult {
    let mut member = Member::open(false)?;
    member.with_users().await?;
    let token = member.authenticate(ROOT_USER).await?;
    let root = member.auth.caller(&with_token(&token)).await?;
    let put = Internal::Put(PutRequest {
        key: b"/app/a".to_vec().into(),
        ..PutRequest::default()
    });
    let no_lease = |_| Vec::new();
    member
        .auth
        .check_applied(Some(&root.header()), &put, &no_lease)?;
    // The store changes between the check and the apply: the write is
    // refused, even for root, as etcd refuses it.
    member.apply(None, grant("alice", ROOT_ROLE))?;
    assert_eq!(
        member
            .auth
            .check_applied(Some(&root.header()), &put, &no_lease),
        Err(etcd::AUTH_OLD_REVISION)
    );
    // So is a read whose caller was resolved before the change, once it
    // has run.
    assert_eq!(
        member.auth.check_still_current(&root),
        Err(etcd::AUTH_OLD_REVISION)
    );
    // Resolved again, the caller is current.
    let root = member.auth.caller(&with_token(&token)).await?;
    member
        .auth
        .check_applied(Some(&root.header()), &put, &no_lease)?;
    member.auth.check_still_current(&root)?;
    Ok(())
}

#[tokio::test]
async fn a_jwt_signed_before_the_store_changed_is_refused_as_old_revision() -> TestResult {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])?.self_signed(&key)?;
    let keys = tempfile::tempdir()?;
    let (cert_file, key_file) = (keys.path().join("cert.pem"), keys.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    let spec = format!(
        "jwt,pub-key={},priv-key={},sign-method=ES256",
        cert_file.display(),
        key_file.display()
    );
    let mut member = Member::open_with(&spec, false)?;
    member.with_users().await?;
    let token = member.authenticate("alice").await?;
    let alice = member.auth.caller(&with_token(&token)).await?;
    member.auth.check(&alice, Access::Read, b"/app/a", b"")?;
    // As etcd's: a JWT names the auth revision it was signed at, so after
    // any change its requests fail until the client authenticates again.
    member.apply(
        None,
        AuthOp::RoleAdd(AuthRoleAddRequest {
            name: "other".to_string(),
        }),
    )?;
    let stale = member.auth.caller(&with_token(&token)).await?;
    assert_eq!(
        member.auth.check(&stale, Access::Read, b"/app/a", b""),
        Err(etcd::AUTH_OLD_REVISION)
    );
    let fresh = member.authenticate("alice").await?;
    let alice = member.auth.caller(&with_token(&fresh)).await?;
    member.auth.check(&alice, Access::Read, b"/app/a", b"")?;
    Ok(())
}
