//! Requester signing keys: `phm keys new` writes a PKCS#8 PEM Ed25519 private key
//! (mode 0600) and FILE.pub with the base64 public key that policy files list.

use crate::signing::{self, PrivateKey};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is not an Ed25519 private key in PKCS#8 PEM form ({reason}); make one with `phm keys new --out {path}`"
    )]
    Parse { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a key (delete it first)")]
    Exists { path: PathBuf },
    #[error("cannot encode the key: {0}")]
    Encode(String),
}

/// A key as written: where, and the public half in policy form.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub private_path: PathBuf,
    pub public_path: PathBuf,
    pub public_key_base64: String,
}

/// `FILE.pub`: where the public half of the secret in FILE is written.
pub fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Generate a fresh key from the OS random source and write FILE and FILE.pub.
pub fn new_key_file(path: &Path) -> Result<NewKey, KeyFileError> {
    let key = PrivateKey::generate(&mut rand::rngs::OsRng);
    let pem = signing::private_key_to_pem(&key).map_err(|e| KeyFileError::Encode(e.to_string()))?;
    write_secret(path, pem.as_bytes())?;
    let public_key_base64 = signing::public_key_to_base64(&key.verifying_key());
    let public_path = pub_path(path);
    std::fs::write(&public_path, format!("{public_key_base64}\n")).map_err(|source| {
        KeyFileError::Write {
            path: public_path.clone(),
            source,
        }
    })?;
    Ok(NewKey {
        private_path: path.to_path_buf(),
        public_path,
        public_key_base64,
    })
}

/// Write a new secret file (a requester key, a node identity): created 0600, never
/// over an existing file, and synced.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    if path.exists() {
        return Err(KeyFileError::Exists {
            path: path.to_path_buf(),
        });
    }
    use std::io::Write;
    let err = |source| KeyFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Created 0600 so the key is never readable by others, not even briefly.
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Read a requester's private key, with errors that name the file.
pub fn load_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    signing::private_key_from_pem(&text).map_err(|e| KeyFileError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The requester id a key file stands for: its file stem (`keys/dsu.key` → `dsu`).
pub fn requester_from_path(path: &Path) -> Option<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_key_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsu.key");
        let k = new_key_file(&path).unwrap();
        let key = load_private_key(&path).unwrap();
        assert_eq!(
            signing::public_key_to_base64(&key.verifying_key()),
            k.public_key_base64
        );
        let pub_text = std::fs::read_to_string(&k.public_path).unwrap();
        assert_eq!(pub_text.trim(), k.public_key_base64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            new_key_file(&path),
            Err(KeyFileError::Exists { .. })
        ));
        assert_eq!(requester_from_path(&path).as_deref(), Some("dsu"));
    }

    #[test]
    fn bad_key_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.key");
        std::fs::write(&path, "not a key").unwrap();
        let e = load_private_key(&path).unwrap_err().to_string();
        assert!(e.contains("broken.key"), "{e}");
        let missing = dir.path().join("missing.key");
        let e = load_private_key(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.key"), "{e}");
    }
}
