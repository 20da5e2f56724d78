//! Sealed frames: one node's message to another, relayed by the coordinator.
//!
//! A frame is HPKE Base mode (RFC 9180: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! ChaCha20-Poly1305) to the recipient's registered X25519 key, with the canonical header
//! bytes as AEAD associated data, then signed by the sender's registered Ed25519 key over
//! the header, the encapsulated key and the ciphertext. So the coordinator can read only the
//! header (which it needs for routing), cannot read the body, cannot forge a frame from any
//! node, and cannot move a body under another header (the AEAD and the signature both cover
//! it). Ordering and replay are per session: see [`crate::Inbox`].
//!
//! Why not HPKE Auth mode: DHKEM's Auth mode allows key-compromise impersonation and the
//! standards-track HPKE revision drops it (research memo `linkage.md`, "Keys."); a signature
//! also lets a third party (an auditor) check who sent a frame.

use std::fmt;

use ed25519_dalek::{Signature, Signer as _};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::rand_core::{CryptoRng, RngCore};
use hpke::{Deserializable as _, OpModeR, OpModeS, Serializable as _};
use rand_core::{OsRng, UnwrapErr};
use zeroize::Zeroizing;

use crate::MAX_FRAME_BYTES;
use crate::canon::{Canon, field_len};
use crate::error::RelayError;
use crate::identity::{Kem, NodeId, NodeIdentity, NodePublic, shorten};
use crate::registry::VerifiedRegistry;

/// Which protocol a frame or session belongs to. Its label starts every header, so a frame
/// of one protocol can never be accepted by the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Privacy-preserving linkage on NHS number (DH-PSI).
    Link,
    /// Secure aggregation (Bonawitz et al.'s active variant).
    SecAgg,
}

impl Protocol {
    /// The domain label: `"phm-link/v1"` or `"phm-secagg/v1"`.
    pub const fn label(self) -> &'static str {
        match self {
            Protocol::Link => "phm-link/v1",
            Protocol::SecAgg => "phm-secagg/v1",
        }
    }

    /// The protocol a label names, for decoding a wire field.
    pub fn from_label(label: &str) -> Option<Protocol> {
        [Protocol::Link, Protocol::SecAgg]
            .into_iter()
            .find(|p| p.label() == label)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What the coordinator may read of a frame: everything it needs to route it, and all of
/// it authenticated (AEAD associated data and signed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub protocol: Protocol,
    pub federation_id: String,
    /// SHA-256 of the signed query's canonical bytes (phm-proto's `QueryBody::digest`).
    pub query_digest: [u8; 32],
    /// See [`crate::session_id`].
    pub session_id: [u8; 32],
    pub from: NodeId,
    pub to: NodeId,
    /// The protocol round this frame belongs to.
    pub round: u32,
    /// Position of this frame within its round, from 0, without gaps.
    pub seq: u32,
    /// The sender's final frame of this round.
    pub last: bool,
}

/// Bytes of the encapsulated key (an X25519 public key).
pub const ENC_LEN: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// ChaCha20-Poly1305 tag bytes that a ciphertext adds to its plaintext.
pub const TAG_LEN: usize = 16;

/// Label of the HPKE `info` string.
const INFO_LABEL: &str = "phm-relay/v1 hpke info";
/// Label of the bytes a frame signature covers.
const FRAME_SIG_LABEL: &str = "phm-relay/v1 frame";
/// Label of the bytes a statement signature covers.
const STATEMENT_LABEL: &str = "phm-relay/v1 statement";

impl Header {
    /// The canonical bytes: HPKE associated data, and the start of what is signed.
    /// (protocol label, federation id, query digest, session id, from, to, round, seq, last).
    pub fn aad(&self) -> Vec<u8> {
        let mut c = Canon::new(self.protocol.label());
        c.bytes(self.federation_id.as_bytes())
            .fixed(&self.query_digest)
            .fixed(&self.session_id)
            .bytes(self.from.as_str().as_bytes())
            .bytes(self.to.as_str().as_bytes())
            .u32(self.round)
            .u32(self.seq)
            .bool(self.last);
        c.finish()
    }

    /// Length of [`Header::aad`] without building it.
    fn aad_len(&self) -> usize {
        field_len(self.protocol.label().len())
            .saturating_add(field_len(self.federation_id.len()))
            .saturating_add(64)
            .saturating_add(field_len(self.from.as_str().len()))
            .saturating_add(field_len(self.to.as_str().len()))
            .saturating_add(9)
    }

    /// HPKE `info`: binds the key schedule to the protocol and the session, so that keys
    /// derived for one session are useless in another even before the AEAD check.
    fn info(&self) -> Vec<u8> {
        let mut c = Canon::new(INFO_LABEL);
        c.bytes(self.protocol.label().as_bytes())
            .fixed(&self.session_id);
        c.finish()
    }
}

/// A sealed, signed frame as it travels through the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFrame {
    header: Header,
    enc: [u8; ENC_LEN],
    ciphertext: Vec<u8>,
    signature: [u8; SIGNATURE_LEN],
}

impl SealedFrame {
    /// Rebuild a frame from its wire parts, checking lengths and the size cap (but nothing
    /// cryptographic: that is [`open`]'s job).
    pub fn from_parts(
        header: Header,
        enc: &[u8],
        ciphertext: Vec<u8>,
        signature: &[u8],
    ) -> Result<SealedFrame, RelayError> {
        let enc: [u8; ENC_LEN] = enc.try_into().map_err(|_| {
            RelayError::MalformedFrame(format!(
                "encapsulated key is {} bytes; it must be {ENC_LEN}",
                enc.len()
            ))
        })?;
        let signature: [u8; SIGNATURE_LEN] = signature.try_into().map_err(|_| {
            RelayError::MalformedFrame(format!(
                "signature is {} bytes; it must be {SIGNATURE_LEN}",
                signature.len()
            ))
        })?;
        let frame = SealedFrame {
            header,
            enc,
            ciphertext,
            signature,
        };
        frame.check_size()?;
        Ok(frame)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The HPKE encapsulated key.
    pub fn enc(&self) -> &[u8; ENC_LEN] {
        &self.enc
    }

    pub fn ciphertext(&self) -> &[u8] {
        &self.ciphertext
    }

    pub fn signature(&self) -> &[u8; SIGNATURE_LEN] {
        &self.signature
    }

    /// Bytes this frame takes: its canonical header, key, ciphertext and signature. This is
    /// what [`MAX_FRAME_BYTES`] bounds.
    pub fn encoded_len(&self) -> usize {
        self.header
            .aad_len()
            .saturating_add(ENC_LEN)
            .saturating_add(field_len(self.ciphertext.len()))
            .saturating_add(SIGNATURE_LEN)
    }

    fn check_size(&self) -> Result<(), RelayError> {
        let bytes = self.encoded_len();
        if bytes > MAX_FRAME_BYTES {
            return Err(RelayError::FrameTooLarge {
                bytes,
                max: MAX_FRAME_BYTES,
            });
        }
        if self.ciphertext.len() < TAG_LEN {
            return Err(RelayError::MalformedFrame(format!(
                "ciphertext is {} bytes; even an empty message is {TAG_LEN}",
                self.ciphertext.len()
            )));
        }
        Ok(())
    }

    /// The bytes the sender signs: domain label, then header, key and ciphertext, each
    /// length-prefixed so the three can never be re-split differently.
    fn signed_bytes(aad: &[u8], enc: &[u8; ENC_LEN], ciphertext: &[u8]) -> Vec<u8> {
        let mut c = Canon::new(FRAME_SIG_LABEL);
        c.bytes(aad).fixed(enc).bytes(ciphertext);
        c.finish()
    }

    #[cfg(test)]
    pub(crate) fn parts_mut(
        &mut self,
    ) -> (
        &mut Header,
        &mut [u8; ENC_LEN],
        &mut Vec<u8>,
        &mut [u8; SIGNATURE_LEN],
    ) {
        (
            &mut self.header,
            &mut self.enc,
            &mut self.ciphertext,
            &mut self.signature,
        )
    }
}

/// The largest plaintext a frame can carry under `header` within [`MAX_FRAME_BYTES`].
pub fn max_plaintext_len(header: &Header) -> usize {
    MAX_FRAME_BYTES
        .saturating_sub(header.aad_len())
        .saturating_sub(ENC_LEN + 8 + SIGNATURE_LEN + TAG_LEN)
}

/// Seal `plaintext` from `me` to `recipient` under `header`, with a fresh ephemeral key
/// from the operating system's CSPRNG.
///
/// Checks that the header names `me` as sender and `recipient` as recipient and that the
/// frame fits [`MAX_FRAME_BYTES`]. The caller chooses round, seq and last; [`crate::Outbox`]
/// numbers them for it.
pub fn seal(
    me: &NodeIdentity,
    recipient: &NodePublic,
    header: Header,
    plaintext: &[u8],
) -> Result<SealedFrame, RelayError> {
    // rand_core 0.9's OsRng is fallible; `UnwrapErr` panics if the OS generator fails,
    // exactly as rand 0.8's `OsRng` (which every Ed25519 key in this workspace comes from)
    // does. A process whose kernel cannot supply randomness must not go on encrypting.
    seal_with_rng(me, recipient, header, plaintext, &mut UnwrapErr(OsRng))
}

/// [`seal`] with a caller-supplied CSPRNG (rand_core 0.9 traits, as hpke 0.13 takes).
pub fn seal_with_rng<R: CryptoRng + RngCore>(
    me: &NodeIdentity,
    recipient: &NodePublic,
    header: Header,
    plaintext: &[u8],
    rng: &mut R,
) -> Result<SealedFrame, RelayError> {
    if header.from != *me.node_id() {
        return Err(RelayError::InvalidSession(format!(
            "the header says the frame is from {}, but this node is {}",
            header.from,
            me.node_id()
        )));
    }
    if header.to != recipient.node_id {
        return Err(RelayError::InvalidSession(format!(
            "the header says the frame is to {}, but the recipient key is {}'s",
            header.to, recipient.node_id
        )));
    }
    if header.from == header.to {
        return Err(RelayError::SelfAddressed(header.from.clone()));
    }
    let max = max_plaintext_len(&header);
    if plaintext.len() > max {
        return Err(RelayError::FrameTooLarge {
            bytes: plaintext.len(),
            max,
        });
    }
    let seal_failed = |e: hpke::HpkeError| RelayError::SealFailed {
        to: recipient.node_id.clone(),
        reason: e.to_string(),
    };
    let pk = recipient.hpke_key.to_hpke().map_err(seal_failed)?;
    let aad = header.aad();
    let (encapped, ciphertext) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
        &OpModeS::Base,
        &pk,
        &header.info(),
        plaintext,
        &aad,
        rng,
    )
    .map_err(seal_failed)?;
    let mut enc = [0u8; ENC_LEN];
    encapped.write_exact(&mut enc);
    let signature = me
        .signing_key()
        .sign(&SealedFrame::signed_bytes(&aad, &enc, &ciphertext))
        .to_bytes();
    let frame = SealedFrame {
        header,
        enc,
        ciphertext,
        signature,
    };
    frame.check_size()?;
    Ok(frame)
}

/// Open a frame addressed to `me`. In order, cheapest first, so that a frame is refused
/// before any work an attacker could make expensive: the size cap; `to` is this node; `from` is someone else; the federation is the
/// registry's; `from` is in the registry; the Ed25519 signature verifies strictly under the
/// key the registry lists for `from`; and only then HPKE decryption.
///
/// This does not check order, replay or which session the frame belongs to: a frame that
/// opens here may still be a replay. Protocols use [`crate::Inbox`], which makes the same
/// checks and those too.
pub fn open(
    me: &NodeIdentity,
    registry: &VerifiedRegistry,
    frame: &SealedFrame,
) -> Result<(Header, Zeroizing<Vec<u8>>), RelayError> {
    authenticate(me, registry, frame)?;
    let plaintext = decrypt(me, frame)?;
    Ok((frame.header.clone(), plaintext))
}

/// The checks of [`open`] up to and including the signature: after this, the frame is
/// known to be exactly what its sender signed, so a later refusal (wrong session, replay)
/// can be attributed to whoever relayed it rather than to a forger.
pub(crate) fn authenticate(
    me: &NodeIdentity,
    registry: &VerifiedRegistry,
    frame: &SealedFrame,
) -> Result<(), RelayError> {
    frame.check_size()?;
    let header = &frame.header;
    if header.to != *me.node_id() {
        return Err(RelayError::WrongRecipient {
            to: header.to.clone(),
            me: me.node_id().clone(),
        });
    }
    if header.from == header.to {
        return Err(RelayError::SelfAddressed(header.from.clone()));
    }
    if header.federation_id != registry.federation_id() {
        return Err(RelayError::WrongFederation {
            expected: registry.federation_id().to_owned(),
            got: shorten(&header.federation_id),
        });
    }
    let sender = registry
        .get(&header.from)
        .ok_or_else(|| RelayError::UnknownSender(header.from.clone()))?;
    let signed = SealedFrame::signed_bytes(&header.aad(), &frame.enc, &frame.ciphertext);
    sender
        .signing_key
        .verify_strict(&signed, &Signature::from_bytes(&frame.signature))
        .map_err(|_| RelayError::BadSignature {
            from: header.from.clone(),
        })
}

/// HPKE-open an authenticated frame with this node's key, the header as associated data.
pub(crate) fn decrypt(
    me: &NodeIdentity,
    frame: &SealedFrame,
) -> Result<Zeroizing<Vec<u8>>, RelayError> {
    let header = &frame.header;
    let decrypt_failed = || RelayError::DecryptFailed {
        from: header.from.clone(),
    };
    let encapped =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(&frame.enc).map_err(|_| decrypt_failed())?;
    let plaintext = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Base,
        me.hpke_secret(),
        &encapped,
        &header.info(),
        &frame.ciphertext,
        &header.aad(),
    )
    .map_err(|_| decrypt_failed())?;
    Ok(Zeroizing::new(plaintext))
}

/// A signed statement: for what a protocol broadcasts in the clear through the coordinator
/// but every peer must be able to attribute (secure aggregation's advertised keys, its
/// consistency-round survivor set). Bound to the protocol, the session and a `kind` label
/// the protocol chooses, and domain-separated from frame signatures.
fn statement_bytes(protocol: Protocol, session_id: &[u8; 32], kind: &str, body: &[u8]) -> Vec<u8> {
    let mut c = Canon::new(STATEMENT_LABEL);
    c.bytes(protocol.label().as_bytes())
        .fixed(session_id)
        .bytes(kind.as_bytes())
        .bytes(body);
    c.finish()
}

impl NodeIdentity {
    /// Sign a statement (see [`NodePublic::verify_statement`]).
    pub fn sign_statement(
        &self,
        protocol: Protocol,
        session_id: &[u8; 32],
        kind: &str,
        body: &[u8],
    ) -> [u8; SIGNATURE_LEN] {
        self.signing_key()
            .sign(&statement_bytes(protocol, session_id, kind, body))
            .to_bytes()
    }
}

/// One statement of a batch for [`verify_statements`]: who signed it, its body, and the
/// signature's bytes.
#[derive(Debug, Clone, Copy)]
pub struct StatementCheck<'a> {
    pub signer: &'a NodePublic,
    pub body: &'a [u8],
    pub signature: &'a [u8],
}

/// Verify many statements of one kind in one session at once, with ed25519-dalek's batch
/// verification (one multiscalar multiplication for the lot: about half the time of one
/// check each, measured in BENCHMARKS.md "Secure aggregation"). If the batch fails,
/// each statement is checked strictly on its own and the position of the first that
/// fails is returned, so the caller can name the signer as a one-by-one check would.
///
/// Batch verification is cofactored: it accepts every signature `verify_strict` accepts
/// and also one whose R differs by a small-order point, which only the signer can make
/// (from a signature of its own). That is malleability, not forgery; nothing here uses a
/// signature's bytes as an identifier, so callers that need strictness keep
/// [`NodePublic::verify_statement`].
pub fn verify_statements(
    protocol: Protocol,
    session_id: &[u8; 32],
    kind: &str,
    checks: &[StatementCheck<'_>],
) -> Result<(), usize> {
    let mut signatures = Vec::with_capacity(checks.len());
    for (i, c) in checks.iter().enumerate() {
        let bytes: [u8; SIGNATURE_LEN] = c.signature.try_into().map_err(|_| i)?;
        signatures.push(Signature::from_bytes(&bytes));
    }
    let messages: Vec<Vec<u8>> = checks
        .iter()
        .map(|c| statement_bytes(protocol, session_id, kind, c.body))
        .collect();
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> =
        checks.iter().map(|c| c.signer.signing_key).collect();
    if ed25519_dalek::verify_batch(&refs, &signatures, &keys).is_ok() {
        return Ok(());
    }
    for (i, c) in checks.iter().enumerate() {
        c.signer
            .verify_statement(protocol, session_id, kind, c.body, c.signature)
            .map_err(|_| i)?;
    }
    // Whatever the batch refused, some signature fails the strict check too (a strict
    // signature satisfies the cofactored equation); refuse if none did, to fail closed.
    Err(0)
}

impl NodePublic {
    /// Verify (strictly) a statement signed by this node with [`NodeIdentity::sign_statement`].
    pub fn verify_statement(
        &self,
        protocol: Protocol,
        session_id: &[u8; 32],
        kind: &str,
        body: &[u8],
        signature: &[u8],
    ) -> Result<(), RelayError> {
        let bad = || RelayError::BadSignature {
            from: self.node_id.clone(),
        };
        let signature: [u8; SIGNATURE_LEN] = signature.try_into().map_err(|_| bad())?;
        self.signing_key
            .verify_strict(
                &statement_bytes(protocol, session_id, kind, body),
                &Signature::from_bytes(&signature),
            )
            .map_err(|_| bad())
    }
}
