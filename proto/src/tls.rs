//! The TLS plumbing every phm process shares: one rustls crypto provider for the
//! process, and reading PEM files with an error that names what the file was for.

use std::path::{Path, PathBuf};

/// A PEM file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {what} {path}: {cause}")]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{what} {path} holds no PEM block (expected \"-----BEGIN …\")")]
    NotPem { what: &'static str, path: PathBuf },
}

/// Install ring as rustls's process-wide provider. Idempotent; needed because a second
/// provider anywhere in the binary would make rustls refuse to pick one (and TLS set-up
/// would panic at start).
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Read a PEM file (certificate, key or CA bundle); `what` says what it is for, e.g.
/// "client CA" or "tls.cert", so the error can say which setting to fix.
pub fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    let bytes = std::fs::read(path).map_err(|cause| PemError::Read {
        what,
        path: path.to_path_buf(),
        cause,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(PemError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_what_it_is_for() {
        let dir = std::env::temp_dir().join(format!("phm-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = read_pem("client CA", &dir.join("missing.pem")).unwrap_err();
        assert!(missing.to_string().contains("client CA"), "{missing}");
        assert!(missing.to_string().contains("missing.pem"), "{missing}");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = read_pem("tls.cert", &junk).unwrap_err();
        assert!(matches!(e, PemError::NotPem { .. }), "{e}");
        let good = dir.join("good.pem");
        std::fs::write(
            &good,
            "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(read_pem("tls.cert", &good).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
