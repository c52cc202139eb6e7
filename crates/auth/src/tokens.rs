//! Auth tokens, as etcd's --auth-token: `simple` tokens that every member
//! learns through the log and keeps in memory with a TTL, or signed `jwt`
//! tokens that any member checks on its own.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_api::duration::parse_go_duration;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{AuthError, KeyError, TokenFlagError};

/// etcd's default JWT lifetime.
const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);
/// Letters of a simple token's random part, as etcd's.
const SIMPLE_TOKEN_LEN: usize = 16;

pub enum Tokens {
    Simple(SimpleTokens),
    Jwt(Jwt),
}

impl Tokens {
    /// The provider --auth-token names; `ttl` is --auth-token-ttl, which
    /// simple tokens live for since their last use.
    pub fn from_flag(spec: &str, ttl: Duration) -> Result<Tokens, TokenFlagError> {
        let mut parts = spec.split(',');
        match parts.next().unwrap_or_default() {
            "simple" => Ok(Tokens::Simple(SimpleTokens::new(ttl))),
            "jwt" => Ok(Tokens::Jwt(Jwt::from_options(parts)?)),
            other => Err(TokenFlagError::UnknownType(other.to_string())),
        }
    }
}

/// Simple tokens: `<random letters>.<raft index of the authentication>`,
/// valid until unused for the TTL, the member restarts, auth is disabled, or
/// the user is deleted or changes password.
pub struct SimpleTokens {
    ttl: Duration,
    tokens: Mutex<HashMap<String, SimpleToken>>,
}

struct SimpleToken {
    user: String,
    expires: Instant,
}

impl SimpleTokens {
    pub fn new(ttl: Duration) -> SimpleTokens {
        SimpleTokens {
            ttl,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh random part for a proposer to send.
    pub fn random_part() -> Result<String, getrandom::Error> {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut bytes = [0u8; SIMPLE_TOKEN_LEN];
        getrandom::getrandom(&mut bytes)?;
        Ok(bytes
            .iter()
            .map(|b| LETTERS[usize::from(*b) % LETTERS.len()] as char)
            .collect())
    }

    /// The raft index a token was assigned at, if it is one of ours at all.
    pub fn index_of(token: &str) -> Option<u64> {
        token.rsplit_once('.')?.1.parse().ok()
    }

    pub fn assign(&self, token: String, user: &str) {
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        // Forgotten tokens go when new ones come: the map stays bounded by
        // the authentications of one TTL.
        tokens.retain(|_, t| t.expires > now);
        tokens.insert(
            token,
            SimpleToken {
                user: user.to_string(),
                expires: now + self.ttl,
            },
        );
    }

    /// The user of a live token; using it extends its life.
    pub fn user(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        let found = tokens.get_mut(token)?;
        if found.expires <= now {
            tokens.remove(token);
            return None;
        }
        found.expires = now + self.ttl;
        Some(found.user.clone())
    }

    pub fn invalidate_user(&self, user: &str) {
        self.tokens.lock().retain(|_, t| t.user != user);
    }

    pub fn clear(&self) {
        self.tokens.lock().clear();
    }
}

/// Signed tokens: etcd's claims (`username`, `revision`, `exp`).
pub struct Jwt {
    algorithm: Algorithm,
    /// Without a private key this member verifies tokens but issues none.
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    ttl: Duration,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

impl Jwt {
    /// etcd's options: `pub-key=`, `priv-key=`, `sign-method=`, `ttl=`.
    fn from_options<'a>(options: impl Iterator<Item = &'a str>) -> Result<Jwt, TokenFlagError> {
        let (mut pub_key, mut priv_key, mut method, mut ttl) = (None, None, None, None);
        for option in options {
            let (name, value) = option
                .split_once('=')
                .ok_or_else(|| TokenFlagError::NoValue(option.to_string()))?;
            match name {
                "pub-key" => pub_key = Some(value.to_string()),
                "priv-key" => priv_key = Some(value.to_string()),
                "sign-method" => method = Some(value.to_string()),
                "ttl" => {
                    ttl = Some(
                        parse_go_duration(value)
                            .ok_or_else(|| TokenFlagError::InvalidTtl(value.to_string()))?,
                    )
                }
                other => return Err(TokenFlagError::UnknownOption(other.to_string())),
            }
        }
        let method = method.ok_or(TokenFlagError::NoSignMethod)?;
        let algorithm: Algorithm = method
            .parse()
            .map_err(|_| TokenFlagError::UnsupportedSignMethod(method.clone()))?;
        let missing = |option| TokenFlagError::KeyMissing {
            method: method.clone(),
            option,
        };
        let hmac = matches!(
            algorithm,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        );
        let (encoding, decoding) = if hmac {
            // etcd reads an HMAC secret from priv-key.
            let file = priv_key.ok_or_else(|| missing("priv-key"))?;
            let secret = read(file)?;
            (
                Some(EncodingKey::from_secret(&secret)),
                DecodingKey::from_secret(&secret),
            )
        } else {
            let file = pub_key.ok_or_else(|| missing("pub-key"))?;
            let decoding = decoding_key(algorithm, &read(file.clone())?).map_err(|source| {
                TokenFlagError::Key {
                    option: "pub-key",
                    path: file,
                    source,
                }
            })?;
            let encoding = match priv_key {
                Some(file) => {
                    let pem = read(file.clone())?;
                    let key = match algorithm {
                        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
                        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
                        _ => EncodingKey::from_rsa_pem(&pem),
                    };
                    Some(key.map_err(|e| TokenFlagError::Key {
                        option: "priv-key",
                        path: file,
                        source: e.into(),
                    })?)
                }
                None => None,
            };
            (encoding, decoding)
        };
        Ok(Jwt {
            algorithm,
            encoding,
            decoding,
            ttl: ttl.unwrap_or(DEFAULT_JWT_TTL),
        })
    }

    /// A token for `username` at auth revision `revision`.
    pub fn sign(&self, username: &str, revision: u64) -> Result<String, AuthError> {
        let key = self.encoding.as_ref().ok_or(AuthError::NoSigningKey)?;
        let exp = (SystemTime::now() + self.ttl)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp,
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key).map_err(AuthError::Sign)
    }

    /// The user and auth revision of a valid, unexpired token.
    pub fn verify(&self, token: &str) -> Option<(String, u64)> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        Some((data.claims.username, data.claims.revision))
    }
}

/// A key file's bytes.
fn read(path: String) -> Result<Vec<u8>, TokenFlagError> {
    std::fs::read(&path).map_err(|source| TokenFlagError::Read { path, source })
}

/// A verification key from a public key or, as etcd's fixtures give, a
/// certificate.
fn decoding_key(algorithm: Algorithm, pem: &[u8]) -> Result<DecodingKey, KeyError> {
    let ec = matches!(algorithm, Algorithm::ES256 | Algorithm::ES384);
    if pem.windows(16).any(|w| w == b"BEGIN CERTIFICATE") {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem).map_err(KeyError::Pem)?;
        let cert = parsed.parse_x509().map_err(KeyError::Certificate)?;
        let raw = &cert.public_key().subject_public_key.data;
        return Ok(match algorithm {
            _ if ec => DecodingKey::from_ec_der(raw),
            Algorithm::EdDSA => DecodingKey::from_ed_der(raw),
            _ => DecodingKey::from_rsa_der(raw),
        });
    }
    Ok(match algorithm {
        _ if ec => DecodingKey::from_ec_pem(pem)?,
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem)?,
        _ => DecodingKey::from_rsa_pem(pem)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn simple_tokens_expire_unless_used_and_go_with_their_user() -> TestResult {
        let tokens = SimpleTokens::new(Duration::from_millis(200));
        let token = format!("{}.7", SimpleTokens::random_part()?);
        assert_eq!(SimpleTokens::index_of(&token), Some(7));
        tokens.assign(token.clone(), "alice");
        tokens.assign("other.8".into(), "bob");
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(tokens.user(&token).as_deref(), Some("alice"));
        }
        // Unused for longer than the TTL.
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(tokens.user(&token), None);
        tokens.assign("again.9".into(), "alice");
        tokens.invalidate_user("alice");
        assert_eq!(tokens.user("again.9"), None);
        assert_eq!(tokens.user("missing.1"), None);
        Ok(())
    }

    #[test]
    fn flag_errors_say_what_is_wrong() {
        let message = |spec: &str| {
            Tokens::from_flag(spec, Duration::from_secs(300))
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(message("simple"), None);
        let cases = [
            ("magic", "--auth-token: unknown token type \"magic\""),
            ("jwt,ttl", "--auth-token: option \"ttl\" has no value"),
            ("jwt,ttl=5x", "--auth-token: invalid ttl \"5x\""),
            (
                "jwt,colour=red",
                "--auth-token: unknown jwt option \"colour\"",
            ),
            ("jwt,ttl=5m", "--auth-token: jwt needs sign-method"),
            (
                "jwt,sign-method=XX",
                "--auth-token: unsupported sign-method \"XX\"",
            ),
            (
                "jwt,sign-method=HS256",
                "--auth-token: HS256 needs priv-key",
            ),
            ("jwt,sign-method=RS256", "--auth-token: RS256 needs pub-key"),
            (
                "jwt,sign-method=RS256,pub-key=/nonexistent",
                "reading /nonexistent",
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(message(spec).as_deref(), Some(expected), "{spec}");
        }
    }

    #[test]
    fn jwt_tokens_verify_with_the_certificates_key_and_expire() -> TestResult {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_string()])?.self_signed(&key)?;
        let dir = tempfile::tempdir()?;
        let cert_file = dir.path().join("cert.pem");
        let key_file = dir.path().join("key.pem");
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        let spec = format!(
            "jwt,pub-key={},priv-key={},sign-method=ES256,ttl=1s",
            cert_file.display(),
            key_file.display()
        );
        let Tokens::Jwt(jwt) = Tokens::from_flag(&spec, Duration::from_secs(300))? else {
            panic!("not a jwt provider");
        };
        let token = jwt.sign("alice", 4)?;
        assert_eq!(jwt.verify(&token), Some(("alice".to_string(), 4)));
        assert_eq!(jwt.verify(&format!("{token}x")), None);
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(jwt.verify(&token), None);
        Ok(())
    }
}
