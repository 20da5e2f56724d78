//! Node identities, the federation registry signed by the IG leads, and end-to-end sealed
//! frames that one node sends another through the coordinator, which relays them but cannot
//! read, forge, splice or replay them. Shared by linkage and secure aggregation.
//!
//! Pure, like `phm-policies`: no IO, no async, no gRPC. Callers read files and pass text in,
//! and carry [`SealedFrame`]s in their own wire messages.
//!
//! * [`NodeIdentity`]: a node's Ed25519 signing key and X25519 HPKE key, its identity file,
//!   and its public half [`NodePublic`].
//! * [`Registry`]: every node's public keys and validity, signed by the registry key;
//!   [`Registry::verify`] gives the [`VerifiedRegistry`] that frames are checked against.
//! * [`seal`] / [`open`]: HPKE Base mode to the recipient, header as associated data,
//!   Ed25519 signature by the sender; [`Inbox`] / [`Outbox`] keep each session's frames in
//!   order and refuse replays, splices and frames after the last.
//! * [`session_id`]: the 32-byte name of one protocol run, bound into everything above.

mod canon;
mod error;
mod frame;
mod identity;
mod inbox;
mod registry;
mod session;

#[cfg(test)]
mod tests;

pub use error::{IdentityFileError, RelayError};
pub use frame::{
    ENC_LEN, Header, Protocol, SIGNATURE_LEN, SealedFrame, StatementCheck, TAG_LEN,
    max_plaintext_len, open, seal, seal_with_rng, verify_statements,
};
pub use identity::{
    HpkePublicKey, MAX_FEDERATION_ID_LEN, MAX_NODE_ID_LEN, NodeId, NodeIdentity, NodePublic,
    signing_key_from_base64, signing_key_to_base64, validate_federation_id,
};
pub use inbox::{Delivered, Inbox, Outbox, SessionContext};
pub use registry::{Registry, RegistryEntry, VerifiedRegistry};
pub use session::{MAX_SESSION_NONCE_LEN, MIN_SESSION_NONCE_LEN, parse_digest, session_id};

/// Re-exported so callers name the same key types as this crate.
pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// Largest frame, header and signature included, accepted or produced: the node's
/// `max_message_bytes` (4 MiB). Checked before any cryptography. Linkage frames of 64k
/// points (about 2.2 MB) fit with room to spare.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
