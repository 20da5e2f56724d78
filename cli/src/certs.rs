//! Development certificates for mutual TLS (`phm certs dev`): a local CA and one leaf per
//! name, each usable as server and client certificate. For demos and tests only; a real
//! deployment uses certificates from the ICS's own PKI.

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate name {0:?} is not usable (use letters, digits, '-', '_' and '.')")]
    BadName(String),
    #[error("cannot build the certificate for {name}: {source}")]
    Build { name: String, source: rcgen::Error },
    #[error("cannot read the existing CA in {path}: {reason}")]
    ExistingCa { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

fn validity(params: &mut CertificateParams) {
    let today = chrono::Utc::now().date_naive();
    let start = today - chrono::Days::new(1);
    let end = today + chrono::Days::new(825);
    params.not_before = rcgen::date_time_ymd(start.year(), start.month() as u8, start.day() as u8);
    params.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8);
}

/// What `dev` wrote.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca_pem: PathBuf,
    pub reused_ca: bool,
    pub leaves: Vec<(String, PathBuf, PathBuf)>,
}

/// Write DIR/ca.pem + ca.key (or reuse them when both exist) and DIR/<name>.pem +
/// DIR/<name>.key for every name. Leaves carry SANs name, localhost and 127.0.0.1, CN =
/// name, and both serverAuth and clientAuth.
pub fn dev(dir: &Path, names: &[String]) -> Result<DevCerts, CertError> {
    for n in names {
        if !valid_name(n) {
            return Err(CertError::BadName(n.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let build = |name: &str| {
        let name = name.to_string();
        move |source| CertError::Build { name, source }
    };

    let reused_ca = ca_pem_path.exists() && ca_key_path.exists();
    let (ca_key, ca_cert_pem) = if reused_ca {
        let existing = |reason: String| CertError::ExistingCa {
            path: dir.to_path_buf(),
            reason,
        };
        let key_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| existing(e.to_string()))?;
        let cert_pem =
            std::fs::read_to_string(&ca_pem_path).map_err(|e| existing(e.to_string()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| existing(e.to_string()))?;
        (key, cert_pem)
    } else {
        let key = KeyPair::generate().map_err(build("ca"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(build("ca"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "phm development CA");
        params.distinguished_name.push(
            DnType::OrganizationName,
            "phm-federation (development only)",
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let cert = params.self_signed(&key).map_err(build("ca"))?;
        let pem = cert.pem();
        write(&ca_pem_path, &pem, false)?;
        write(&ca_key_path, &key.serialize_pem(), true)?;
        (key, pem)
    };
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, &ca_key).map_err(|e| CertError::ExistingCa {
            path: ca_pem_path.clone(),
            reason: e.to_string(),
        })?;

    let mut leaves = Vec::new();
    for name in names {
        let key = KeyPair::generate().map_err(build(name))?;
        let mut sans = vec![name.clone()];
        for extra in ["localhost", "127.0.0.1"] {
            if !sans.iter().any(|s| s == extra) {
                sans.push(extra.to_string());
            }
        }
        let mut params = CertificateParams::new(sans).map_err(build(name))?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params.signed_by(&key, &issuer).map_err(build(name))?;
        let pem_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        write(&pem_path, &cert.pem(), false)?;
        write(&key_path, &key.serialize_pem(), true)?;
        leaves.push((name.clone(), pem_path, key_path));
    }
    Ok(DevCerts {
        ca_pem: ca_pem_path,
        reused_ca,
        leaves,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn leaves_chain_to_the_ca_with_the_contracted_sans_and_ekus() {
        let dir = tempfile::tempdir().unwrap();
        let out = dev(dir.path(), &["A81001".into(), "coordinator".into()]).unwrap();
        assert!(!out.reused_ca);
        let ca_pem = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let (_, ca_block) = parse_x509_pem(&ca_pem).unwrap();
        let ca = ca_block.parse_x509().unwrap();
        for name in ["A81001", "coordinator"] {
            let pem = std::fs::read(dir.path().join(format!("{name}.pem"))).unwrap();
            let (_, block) = parse_x509_pem(&pem).unwrap();
            let cert = block.parse_x509().unwrap();
            cert.verify_signature(Some(ca.public_key())).unwrap();
            let cn = cert.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), name);
            let san = cert.subject_alternative_name().unwrap().unwrap();
            let names: Vec<String> = san
                .value
                .general_names
                .iter()
                .map(|g| match g {
                    GeneralName::DNSName(d) => d.to_string(),
                    GeneralName::IPAddress(ip) => format!("{ip:?}"),
                    other => format!("{other:?}"),
                })
                .collect();
            assert!(names.contains(&name.to_string()), "{names:?}");
            assert!(names.contains(&"localhost".to_string()), "{names:?}");
            assert!(names.iter().any(|n| n.contains("127")), "{names:?}");
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth);
        }
        // A second run adds names under the same CA.
        let again = dev(dir.path(), &["dsu-client".into()]).unwrap();
        assert!(again.reused_ca);
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_pem);
        assert!(matches!(
            dev(dir.path(), &["bad name".into()]),
            Err(CertError::BadName(_))
        ));
    }
}
