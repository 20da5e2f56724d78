//! Ed25519 signing and verification of queries and requester proofs.
//! Keys are stored as PKCS#8 PEM (private) and base64 (public, as policies list them).

use crate::query::{ProofOp, QueryBody, RequesterProof, SignedQuery};
use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

pub use ed25519_dalek::{SigningKey as PrivateKey, VerifyingKey as PublicKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the query is not signed")]
    Missing,
    #[error("the signature is {0} bytes long; an Ed25519 signature is 64")]
    BadLength(usize),
    #[error(
        "the signature does not match the requester's public key (the query was altered or signed with another key)"
    )]
    Mismatch,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("public key is not valid base64: {0}")]
    Base64(String),
    #[error("public key must be 32 bytes, got {0}")]
    Length(usize),
    #[error("public key is not a valid Ed25519 point")]
    Point,
    #[error("private key is not a PKCS#8 Ed25519 PEM: {0}")]
    Pem(String),
}

fn verify(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> Result<(), SignatureError> {
    if sig.is_empty() {
        return Err(SignatureError::Missing);
    }
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| SignatureError::BadLength(sig.len()))?;
    key.verify_strict(msg, &Signature::from_bytes(&sig))
        .map_err(|_| SignatureError::Mismatch)
}

impl QueryBody {
    pub fn sign(self, key: &SigningKey) -> SignedQuery {
        let signature = key.sign(&self.canonical_bytes()).to_bytes().to_vec();
        SignedQuery {
            body: self,
            signature,
        }
    }
}

impl SignedQuery {
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), SignatureError> {
        verify(key, &self.body.canonical_bytes(), &self.signature)
    }
}

impl RequesterProof {
    /// An unsigned proof by `requester_id` (under `project_id`) for `federation_id`;
    /// name a subject with [`RequesterProof::about`], then [`RequesterProof::sign`].
    pub fn new(
        federation_id: impl Into<String>,
        requester_id: impl Into<String>,
        project_id: Option<String>,
        issued_at_unix_ms: i64,
        nonce: Vec<u8>,
    ) -> RequesterProof {
        RequesterProof {
            federation_id: federation_id.into(),
            subject: None,
            requester_id: requester_id.into(),
            project_id,
            issued_at_unix_ms,
            nonce,
            signature: Vec::new(),
        }
    }

    /// A proof issued now with a fresh nonce: what every requester sends.
    pub fn fresh(
        federation_id: impl Into<String>,
        requester_id: impl Into<String>,
        project_id: Option<String>,
    ) -> RequesterProof {
        Self::new(
            federation_id,
            requester_id,
            project_id,
            crate::query::now_unix_ms(),
            crate::query::fresh_nonce(),
        )
    }

    /// The thing this proof is about (the query id, for GetResult).
    pub fn about(mut self, subject: impl Into<String>) -> RequesterProof {
        self.subject = Some(subject.into());
        self
    }

    /// Sign for `op`.
    pub fn sign(mut self, op: ProofOp, key: &SigningKey) -> RequesterProof {
        self.signature = key.sign(&self.canonical_bytes(op)).to_bytes().to_vec();
        self
    }

    pub fn verify(&self, op: ProofOp, key: &VerifyingKey) -> Result<(), SignatureError> {
        verify(key, &self.canonical_bytes(op), &self.signature)
    }
}

/// Decode a public key as policies write it: standard base64 of the 32 raw bytes.
pub fn public_key_from_base64(s: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Length(bytes.len()))?;
    VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::Point)
}

pub fn public_key_to_base64(key: &VerifyingKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
}

pub fn private_key_from_pem(pem: &str) -> Result<SigningKey, KeyError> {
    SigningKey::from_pkcs8_pem(pem).map_err(|e| KeyError::Pem(e.to_string()))
}

pub fn private_key_to_pem(key: &SigningKey) -> Result<String, KeyError> {
    key.to_pkcs8_pem(Default::default())
        .map(|z| z.to_string())
        .map_err(|e| KeyError::Pem(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{Aggregate, AggregateKind, Purpose};

    fn body() -> QueryBody {
        QueryBody {
            federation_id: "ics-test".into(),
            query_id: "q".into(),
            requester_id: "dsu".into(),
            purpose: Purpose::Planning,
            project_id: None,
            dataset: "gp_patients".into(),
            filter: None,
            group_by: vec![],
            aggregates: vec![Aggregate {
                alias: "n".into(),
                kind: AggregateKind::Count,
                column: None,
            }],
            epsilon: 1.0,
            issued_at_unix_ms: 1,
            nonce: vec![1; 16],
            linkage: None,
            aggregation: Default::default(),
        }
    }

    #[test]
    fn sign_then_verify_and_detect_tampering() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let signed = body().sign(&key);
        assert_eq!(signed.verify(&key.verifying_key()), Ok(()));
        let mut altered = signed.clone();
        altered.body.epsilon = 2.0;
        assert_eq!(
            altered.verify(&key.verifying_key()),
            Err(SignatureError::Mismatch)
        );
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        assert_eq!(
            signed.verify(&other.verifying_key()),
            Err(SignatureError::Mismatch)
        );
        let mut unsigned = signed.clone();
        unsigned.signature.clear();
        assert_eq!(
            unsigned.verify(&key.verifying_key()),
            Err(SignatureError::Missing)
        );
        unsigned.signature = vec![0; 10];
        assert_eq!(
            unsigned.verify(&key.verifying_key()),
            Err(SignatureError::BadLength(10))
        );
    }

    #[test]
    fn keys_round_trip() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let pem = private_key_to_pem(&key).unwrap();
        let back = private_key_from_pem(&pem).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let b64 = public_key_to_base64(&key.verifying_key());
        assert_eq!(public_key_from_base64(&b64).unwrap(), key.verifying_key());
        assert!(matches!(
            public_key_from_base64("not base64!"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(public_key_from_base64("AAAA"), Err(KeyError::Length(3)));
    }
}
