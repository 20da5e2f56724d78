//! Node identities: the long-term Ed25519 signing key and X25519 HPKE key of one node, the
//! identity file that holds them, and the public half that partners and the registry list.
//!
//! The secret keys never leave [`NodeIdentity`]: it signs and decrypts through this crate's
//! functions only, so every signature a node key makes is domain-separated by this crate
//! (frames and statements), and nothing else can be tricked into signing with it.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{SigningKey, VerifyingKey};
use hpke::{Deserializable as _, Kem as _, Serializable as _};
use rand_core::{OsRng, TryRngCore as _};
use zeroize::Zeroizing;

use crate::error::{IdentityFileError, RelayError};

/// The HPKE KEM: DHKEM(X25519, HKDF-SHA256).
pub(crate) type Kem = hpke::kem::X25519HkdfSha256;
pub(crate) type HpkeSecret = <Kem as hpke::Kem>::PrivateKey;

/// Longest node id accepted (as phm-proto's `MAX_ID_LEN`).
pub const MAX_NODE_ID_LEN: usize = 128;
/// Longest federation id accepted (as phm-proto's `MAX_FEDERATION_ID_LEN`).
pub const MAX_FEDERATION_ID_LEN: usize = 128;

/// A node's name in the federation, typically its ODS code (`"RW2"`, `"A81001"`).
///
/// Letters, digits and `_ - . : @`, 1 to [`MAX_NODE_ID_LEN`] bytes: the same rule
/// phm-proto applies to ids on the wire, so an id here is printable in refusals and can
/// never contain the spaces that separate fields of the public text form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    /// Validate `id` as a node id.
    pub fn new(id: impl Into<String>) -> Result<NodeId, RelayError> {
        let id = id.into();
        match check_id(&id, MAX_NODE_ID_LEN, true) {
            Ok(()) => Ok(NodeId(id)),
            Err(reason) => Err(RelayError::InvalidNodeId {
                value: shorten(&id),
                reason,
            }),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = RelayError;
    fn from_str(s: &str) -> Result<NodeId, RelayError> {
        NodeId::new(s)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Check a federation id: as phm-proto's `validate_federation_id` (letters, digits and
/// `_ - . :`, 1 to 128 bytes).
pub fn validate_federation_id(id: &str) -> Result<(), RelayError> {
    check_id(id, MAX_FEDERATION_ID_LEN, false).map_err(|reason| RelayError::InvalidFederationId {
        value: shorten(id),
        reason,
    })
}

fn check_id(id: &str, max: usize, allow_at: bool) -> Result<(), String> {
    if id.is_empty() {
        return Err("it is empty".into());
    }
    if id.len() > max {
        return Err(format!("it is {} bytes long; at most {max}", id.len()));
    }
    let allowed = |c: char| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':') || (allow_at && c == '@')
    };
    if let Some(c) = id.chars().find(|&c| !allowed(c)) {
        let set = if allow_at { "_ - . : @" } else { "_ - . :" };
        return Err(format!("it contains {c:?}; use letters, digits and {set}"));
    }
    Ok(())
}

/// An id quoted in an error message, cut so that a 4 MiB "id" does not become a 4 MiB log line.
pub(crate) fn shorten(s: &str) -> String {
    const KEEP: usize = 64;
    match s.char_indices().nth(KEEP) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// A node's X25519 public key for HPKE (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HpkePublicKey([u8; 32]);

impl HpkePublicKey {
    /// From the 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> HpkePublicKey {
        HpkePublicKey(bytes)
    }

    /// The 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// Standard base64 of the 32 bytes, as policies and config files write keys.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Parse standard base64 of 32 bytes.
    pub fn from_base64(s: &str) -> Result<HpkePublicKey, RelayError> {
        decode_32(s.trim())
            .map(|b| HpkePublicKey(*b))
            .map_err(|reason| RelayError::InvalidKey {
                what: "HPKE (X25519) public key",
                reason,
            })
    }

    pub(crate) fn to_hpke(self) -> Result<<Kem as hpke::Kem>::PublicKey, hpke::HpkeError> {
        <Kem as hpke::Kem>::PublicKey::from_bytes(&self.0)
    }
}

impl fmt::Debug for HpkePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HpkePublicKey({})", self.to_base64())
    }
}

/// Parse an Ed25519 public key from standard base64 (as phm-proto and policies write it),
/// refusing points that are not canonical or of small order: no honest key is either, and
/// `verify_strict` would refuse every signature under such a key anyway.
pub fn signing_key_from_base64(s: &str) -> Result<VerifyingKey, RelayError> {
    let invalid = |reason: String| RelayError::InvalidKey {
        what: "Ed25519 signing public key",
        reason,
    };
    let bytes = decode_32(s.trim()).map_err(invalid)?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| invalid("not a valid Ed25519 point".into()))?;
    if key.is_weak() {
        return Err(invalid("a small-order point, which no real key is".into()));
    }
    Ok(key)
}

/// Standard base64 of an Ed25519 public key.
pub fn signing_key_to_base64(key: &VerifyingKey) -> String {
    B64.encode(key.as_bytes())
}

/// Decode base64 of exactly 32 bytes into a buffer that is wiped on drop (the same path
/// reads secrets from the identity file, so no copy of a secret is left behind).
fn decode_32(s: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    // Room for any base64 of up to 48 bytes, so a slightly long value is reported as the
    // wrong length rather than as a buffer error.
    let mut buf = Zeroizing::new([0u8; 48]);
    if s.len() > 64 {
        return Err(format!("{} characters of base64; 32 bytes are 44", s.len()));
    }
    let n = B64
        .decode_slice(s, &mut buf[..])
        .map_err(|_| "not valid standard base64".to_string())?;
    if n != 32 {
        return Err(format!("{n} bytes; it must be 32"));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&buf[..32]);
    Ok(out)
}

/// The public half of a node identity: what the registry lists and partners pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePublic {
    pub node_id: NodeId,
    /// Ed25519: verifies the node's frames and statements.
    pub signing_key: VerifyingKey,
    /// X25519: frames to this node are sealed to it.
    pub hpke_key: HpkePublicKey,
}

/// First word of the public text form.
const PUBLIC_TAG: &str = "phm-node/v1";

impl NodePublic {
    /// One line to paste into a config file or registry request:
    /// `phm-node/v1 RW2 ed25519:<base64> x25519:<base64>`.
    pub fn to_text(&self) -> String {
        format!(
            "{PUBLIC_TAG} {} ed25519:{} x25519:{}",
            self.node_id,
            signing_key_to_base64(&self.signing_key),
            self.hpke_key.to_base64()
        )
    }

    /// Parse [`NodePublic::to_text`]'s form.
    pub fn from_text(text: &str) -> Result<NodePublic, RelayError> {
        let bad = |s: &str| RelayError::InvalidPublicText(s.to_owned());
        let words: Vec<&str> = text.split_whitespace().collect();
        let [tag, id, sign, kem] = words.as_slice() else {
            return Err(bad(
                "expected four words: `phm-node/v1 <node id> ed25519:<base64> x25519:<base64>`",
            ));
        };
        if *tag != PUBLIC_TAG {
            return Err(bad("it must start with `phm-node/v1`"));
        }
        let node_id = NodeId::new(*id)?;
        let sign = sign
            .strip_prefix("ed25519:")
            .ok_or_else(|| bad("the third word must start with `ed25519:`"))?;
        let kem = kem
            .strip_prefix("x25519:")
            .ok_or_else(|| bad("the fourth word must start with `x25519:`"))?;
        Ok(NodePublic {
            node_id,
            signing_key: signing_key_from_base64(sign)?,
            hpke_key: HpkePublicKey::from_base64(kem)?,
        })
    }
}

impl fmt::Display for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl FromStr for NodePublic {
    type Err = RelayError;
    fn from_str(s: &str) -> Result<NodePublic, RelayError> {
        NodePublic::from_text(s)
    }
}

/// A node's long-term secret keys. Both are wiped from memory when this is dropped
/// (ed25519-dalek's `SigningKey` and x25519-dalek's `StaticSecret`, with its `zeroize`
/// feature, which this crate's manifest turns on, zeroize on drop). Not `Clone`, so a
/// process holds one copy.
pub struct NodeIdentity {
    signing: SigningKey,
    hpke: HpkeSecret,
    public: NodePublic,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secrets.
        f.debug_struct("NodeIdentity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// A fresh identity for `node_id`, both keys from the operating system's CSPRNG.
    pub fn generate(node_id: NodeId) -> Result<NodeIdentity, RelayError> {
        let mut seeds = Zeroizing::new([0u8; 64]);
        OsRng
            .try_fill_bytes(&mut seeds[..])
            .map_err(|e| RelayError::Rng(e.to_string()))?;
        let mut signing = Zeroizing::new([0u8; 32]);
        let mut hpke = Zeroizing::new([0u8; 32]);
        signing.copy_from_slice(&seeds[..32]);
        hpke.copy_from_slice(&seeds[32..]);
        NodeIdentity::from_secrets(node_id, &signing, &hpke)
    }

    /// Build from the two 32-byte secrets: the Ed25519 seed and the X25519 scalar (any 32
    /// bytes are a valid X25519 secret, since X25519 clamps them).
    pub(crate) fn from_secrets(
        node_id: NodeId,
        signing_seed: &[u8; 32],
        hpke_secret: &[u8; 32],
    ) -> Result<NodeIdentity, RelayError> {
        let signing = SigningKey::from_bytes(signing_seed);
        // hpke checks only the length, which the type already fixes: every 32-byte string is
        // an X25519 secret (X25519 clamps it).
        let hpke = HpkeSecret::from_bytes(hpke_secret).map_err(|e| RelayError::InvalidKey {
            what: "HPKE (X25519) secret key",
            reason: e.to_string(),
        })?;
        let mut hpke_public = [0u8; 32];
        Kem::sk_to_pk(&hpke).write_exact(&mut hpke_public);
        let public = NodePublic {
            node_id,
            signing_key: signing.verifying_key(),
            hpke_key: HpkePublicKey(hpke_public),
        };
        Ok(NodeIdentity {
            signing,
            hpke,
            public,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.public.node_id
    }

    /// The public half, to register or pin.
    pub fn public(&self) -> &NodePublic {
        &self.public
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub(crate) fn hpke_secret(&self) -> &HpkeSecret {
        &self.hpke
    }

    /// The identity file's text. It holds both secrets, so it comes back in a buffer that is
    /// wiped on drop; write it to a file only its owner can read (mode 0600).
    ///
    /// The format is a strict subset of TOML (so editors and `toml` tools read it), with a
    /// `version` line first; the public half is repeated in a comment for operators to copy.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut hpke = Zeroizing::new([0u8; 32]);
        self.hpke.write_exact(&mut hpke[..]);
        let signing = Zeroizing::new(self.signing.to_bytes());
        // Reserve everything up front: a String that grows copies itself and leaves the
        // old (secret) buffer behind unwiped.
        let mut out = Zeroizing::new(String::with_capacity(1024));
        out.push_str("# phm node identity. SECRET: whoever holds this file is this node.\n");
        out.push_str("# Keep it readable by the node's user only (mode 0600).\n");
        out.push_str("# public: ");
        out.push_str(&self.public.to_text());
        out.push('\n');
        out.push_str("version = 1\n");
        out.push_str("node_id = \"");
        out.push_str(self.public.node_id.as_str());
        out.push_str("\"\nsigning_secret = \"");
        B64.encode_string(&signing[..], &mut out);
        out.push_str("\"\nhpke_secret = \"");
        B64.encode_string(&hpke[..], &mut out);
        out.push_str("\"\n");
        out
    }

    /// Parse an identity file. Errors name the line and the field, never a value.
    pub fn from_file_text(text: &str) -> Result<NodeIdentity, IdentityFileError> {
        parse_identity(text)
    }
}

/// The fields of an identity file, in the order they are written.
const FIELDS: [&str; 4] = ["version", "node_id", "signing_secret", "hpke_secret"];

fn parse_identity(text: &str) -> Result<NodeIdentity, IdentityFileError> {
    let mut node_id: Option<NodeId> = None;
    let mut signing: Option<Zeroizing<[u8; 32]>> = None;
    let mut hpke: Option<(usize, Zeroizing<[u8; 32]>)> = None;
    let mut seen = [false; FIELDS.len()];
    let mut first_field = true;

    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (key, value) = trimmed
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or(IdentityFileError::Syntax { line })?;
        let Some(index) = FIELDS.iter().position(|f| *f == key) else {
            // A field name is not secret, but bound its length all the same.
            return Err(IdentityFileError::UnknownField {
                line,
                field: shorten(key),
            });
        };
        let field = FIELDS[index];
        if seen[index] {
            return Err(IdentityFileError::DuplicateField { line, field });
        }
        seen[index] = true;
        // `version` first: a future format may change what the other lines mean.
        if first_field && field != "version" {
            return Err(IdentityFileError::Version {
                line,
                reason: "the first field must be `version = 1`".into(),
            });
        }
        first_field = false;
        let bad = |reason: &str| IdentityFileError::BadValue {
            line,
            field,
            reason: reason.to_owned(),
        };
        match field {
            "version" => {
                if value != "1" {
                    return Err(IdentityFileError::Version {
                        line,
                        reason: "this code reads identity files of version 1 only".into(),
                    });
                }
            }
            "node_id" => {
                let s = quoted(value).ok_or_else(|| bad("expected a quoted string"))?;
                let id = NodeId::new(s).map_err(|e| bad(&e.to_string()))?;
                node_id = Some(id);
            }
            // The two secrets: the error must not repeat the value.
            _ => {
                let s = quoted(value).ok_or_else(|| bad("expected a quoted base64 string"))?;
                let key = decode_32(s).map_err(|reason| bad(&reason))?;
                if field == "signing_secret" {
                    signing = Some(key);
                } else {
                    hpke = Some((line, key));
                }
            }
        }
    }

    let missing = |field| IdentityFileError::MissingField { field };
    if !seen[0] {
        return Err(missing("version"));
    }
    let node_id = node_id.ok_or(missing("node_id"))?;
    let signing = signing.ok_or(missing("signing_secret"))?;
    let (hpke_line, hpke) = hpke.ok_or(missing("hpke_secret"))?;
    // Cannot fail in practice (see `from_secrets`), but is reported, not panicked on.
    NodeIdentity::from_secrets(node_id, &signing, &hpke).map_err(|e| IdentityFileError::BadValue {
        line: hpke_line,
        field: "hpke_secret",
        reason: e.to_string(),
    })
}

/// The inside of a `"…"` value. Escapes are refused, not interpreted: no valid value
/// (an id or base64) contains a quote or a backslash.
fn quoted(value: &str) -> Option<&str> {
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains(['"', '\\']) {
        return None;
    }
    Some(inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn node_ids_follow_the_wire_rule() {
        assert!(NodeId::new("RW2").is_ok());
        assert!(NodeId::new("A81001").is_ok());
        assert!(NodeId::new("trust.acute@ics").is_ok());
        for bad in ["", "RW 2", "RW2\n", "é", "a\"b", &"x".repeat(129)] {
            assert!(
                matches!(NodeId::new(bad), Err(RelayError::InvalidNodeId { .. })),
                "{bad:?} was accepted"
            );
        }
        assert!(validate_federation_id("synthetic-ics").is_ok());
        assert!(validate_federation_id("a@b").is_err());
    }

    #[test]
    fn the_identity_file_round_trips() {
        let me = NodeIdentity::generate(id("RW2")).unwrap();
        let text = me.to_file_text();
        let back = NodeIdentity::from_file_text(&text).unwrap();
        assert_eq!(back.public(), me.public());
        assert_eq!(back.signing.to_bytes(), me.signing.to_bytes());
        assert_eq!(back.hpke.to_bytes(), me.hpke.to_bytes());
        // The comment carries the public half, which parses.
        let public_line = text
            .lines()
            .find_map(|l| l.strip_prefix("# public: "))
            .unwrap();
        assert_eq!(&NodePublic::from_text(public_line).unwrap(), me.public());
        // And the file is TOML.
        let value: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(value["node_id"].as_str(), Some("RW2"));
    }

    #[test]
    fn two_identities_differ() {
        let a = NodeIdentity::generate(id("RW2")).unwrap();
        let b = NodeIdentity::generate(id("RW2")).unwrap();
        assert_ne!(a.public().signing_key, b.public().signing_key);
        assert_ne!(a.public().hpke_key, b.public().hpke_key);
    }

    #[test]
    fn a_malformed_identity_file_names_the_line_and_field() {
        let me = NodeIdentity::generate(id("RW2")).unwrap();
        let good = me.to_file_text().to_string();
        let secret = good
            .lines()
            .find_map(|l| l.strip_prefix("hpke_secret = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap()
            .to_owned();
        // The good file's lines: 3 comments, then version (4), node_id (5), signing (6), hpke (7).
        let cases: Vec<(String, IdentityFileError)> = vec![
            (
                good.replace(&secret, &secret[..40]),
                IdentityFileError::BadValue {
                    line: 7,
                    field: "hpke_secret",
                    reason: "30 bytes; it must be 32".into(),
                },
            ),
            (
                good.replace("version = 1", "version = 2"),
                IdentityFileError::Version {
                    line: 4,
                    reason: "this code reads identity files of version 1 only".into(),
                },
            ),
            (
                good.replace("version = 1\n", ""),
                IdentityFileError::Version {
                    line: 4,
                    reason: "the first field must be `version = 1`".into(),
                },
            ),
            (
                format!("{good}hpke_secrt = \"x\"\n"),
                IdentityFileError::UnknownField {
                    line: 8,
                    field: "hpke_secrt".into(),
                },
            ),
            (
                format!("{good}node_id = \"RW2\"\n"),
                IdentityFileError::DuplicateField {
                    line: 8,
                    field: "node_id",
                },
            ),
            (
                good.lines()
                    .filter(|l| !l.starts_with("signing_secret"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                IdentityFileError::MissingField {
                    field: "signing_secret",
                },
            ),
            (
                good.replace("node_id = \"RW2\"", "node_id = RW2"),
                IdentityFileError::BadValue {
                    line: 5,
                    field: "node_id",
                    reason: "expected a quoted string".into(),
                },
            ),
            (
                good.replace("node_id = \"RW2\"", "node_id: \"RW2\""),
                IdentityFileError::Syntax { line: 5 },
            ),
            (
                good.replace(&secret, "!!!!"),
                IdentityFileError::BadValue {
                    line: 7,
                    field: "hpke_secret",
                    reason: "not valid standard base64".into(),
                },
            ),
        ];
        for (text, want) in cases {
            let got = NodeIdentity::from_file_text(&text).unwrap_err();
            assert_eq!(got, want);
            let shown = got.to_string();
            assert!(
                !shown.contains(&secret[..20]),
                "the error shows the secret: {shown}"
            );
        }
        assert_eq!(
            NodeIdentity::from_file_text("").unwrap_err(),
            IdentityFileError::MissingField { field: "version" }
        );
    }

    #[test]
    fn public_text_round_trips_and_says_what_is_wrong() {
        let me = NodeIdentity::generate(id("A81001")).unwrap();
        let text = me.public().to_text();
        assert_eq!(&NodePublic::from_text(&text).unwrap(), me.public());
        assert_eq!(&text.parse::<NodePublic>().unwrap(), me.public());

        let err = NodePublic::from_text("phm-node/v1 RW2").unwrap_err();
        assert!(matches!(err, RelayError::InvalidPublicText(_)), "{err}");
        let swapped = text.replace("ed25519:", "x").replace("x25519:", "ed25519:");
        assert!(NodePublic::from_text(&swapped).is_err());
        let short = format!(
            "phm-node/v1 RW2 ed25519:{} x25519:AAAA",
            signing_key_to_base64(&me.public().signing_key)
        );
        let err = NodePublic::from_text(&short).unwrap_err();
        assert!(
            matches!(err, RelayError::InvalidKey { what, .. } if what.starts_with("HPKE")),
            "{err}"
        );
    }

    #[test]
    fn weak_signing_keys_are_refused() {
        // The identity point (encoded as 1 followed by zeros) has small order.
        let mut identity_point = [0u8; 32];
        identity_point[0] = 1;
        let err = signing_key_from_base64(&B64.encode(identity_point)).unwrap_err();
        assert!(err.to_string().contains("small-order"), "{err}");
    }

    #[test]
    fn both_secret_keys_are_wiped_on_drop() {
        // Does not compile if x25519-dalek's `zeroize` feature (off under hpke's own
        // dependency line) or ed25519-dalek's is lost. x25519-dalek derives `Zeroize` and
        // its wipe-on-drop under that one feature, so `Zeroize` stands for both.
        fn zeroizable<T: zeroize::Zeroize>() {}
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroizable::<x25519_dalek::StaticSecret>();
        wiped_on_drop::<SigningKey>();
    }

    #[test]
    fn debug_never_prints_secrets() {
        let me = NodeIdentity::generate(id("RW2")).unwrap();
        let shown = format!("{me:?}");
        let signing = B64.encode(me.signing.to_bytes());
        assert!(!shown.contains(&signing));
        assert!(shown.contains("RW2"));
    }
}
