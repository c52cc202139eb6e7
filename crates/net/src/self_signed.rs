//! Auto TLS: self-signed certificates, as etcd's --auto-tls and
//! --peer-auto-tls make them.

use std::path::{Path, PathBuf};

use crate::NetError;

/// A self-signed certificate and its private key, both PEM.
#[derive(Clone)]
pub struct SelfSigned {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for SelfSigned {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl SelfSigned {
    /// A new certificate for these host names and IP addresses.
    pub fn generate(hosts: &[String]) -> Result<SelfSigned, NetError> {
        let mut names = hosts.to_vec();
        if names.is_empty() {
            // A certificate needs some subject; nobody checks it under auto TLS.
            names.push("localhost".to_owned());
        }
        let certified = rcgen::generate_simple_self_signed(names)?;
        Ok(SelfSigned {
            cert_pem: certified.cert.pem().into_bytes(),
            key_pem: certified.signing_key.serialize_pem().into_bytes(),
        })
    }

    /// etcd's --auto-tls certificate: `cert.pem` and `key.pem` in `dir`,
    /// made at the first start and used again after, as etcd does, so a
    /// client that chose to trust the certificate still can after a restart.
    /// Returns the two files.
    pub fn kept_in(dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf), NetError> {
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        if cert_file.exists() && key_file.exists() {
            return Ok((cert_file, key_file));
        }
        std::fs::create_dir_all(dir).map_err(|e| NetError::read("creating", dir, e))?;
        let generated = SelfSigned::generate(hosts)?;
        write_file(&key_file, &generated.key_pem, 0o600)?;
        write_file(&cert_file, &generated.cert_pem, 0o644)?;
        tracing::info!("created cert file {}", cert_file.display());
        Ok((cert_file, key_file))
    }
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), NetError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(contents))
        .map_err(|e| NetError::read("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_certificates_survive_a_restart() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let fixtures = dir.path().join("fixtures/client");
        let (cert, key) = SelfSigned::kept_in(&fixtures, &["localhost".to_owned()])?;
        let pem = std::fs::read(&cert)?;
        assert!(!format!("{:?}", SelfSigned::generate(&[])?).contains("PRIVATE KEY"));
        assert_eq!(SelfSigned::kept_in(&fixtures, &[])?, (cert.clone(), key));
        assert_eq!(std::fs::read(&cert)?, pem);
        Ok(())
    }
}
