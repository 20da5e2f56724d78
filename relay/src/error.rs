//! The one error type of this crate, and the located errors of the identity file.
//!
//! Each variant names what failed, so that a node can audit a refused frame precisely and
//! the integration can map each case to a `Denial` in one place. No message ever contains
//! secret material or plaintext: values from an identity file are never echoed.

use crate::frame::Protocol;
use crate::identity::NodeId;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    // ----- identities and keys -----
    /// A node id that is empty, too long or has characters outside the allowed set.
    #[error("node id {value:?} is invalid: {reason}")]
    InvalidNodeId { value: String, reason: String },
    /// A federation id that is empty, too long or has characters outside the allowed set.
    #[error("federation id {value:?} is invalid: {reason}")]
    InvalidFederationId { value: String, reason: String },
    /// A public key that does not decode (`what` says which key).
    #[error("{what} is invalid: {reason}")]
    InvalidKey { what: &'static str, reason: String },
    /// The public text form of a node (`phm-node/v1 …`) does not parse.
    #[error("node public key text is invalid: {0}")]
    InvalidPublicText(String),
    /// The identity file does not parse.
    #[error(transparent)]
    IdentityFile(#[from] IdentityFileError),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),

    // ----- the registry -----
    /// The registry file does not parse.
    #[error("registry file{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    RegistryFile {
        line: Option<usize>,
        message: String,
    },
    /// The registry carries no signature.
    #[error("the registry is not signed; the IG leads must sign it with the registry key")]
    RegistryUnsigned,
    /// The signature is not the pinned registry key's over these contents.
    #[error(
        "the registry's signature does not verify under the pinned registry key (signed by another key, or altered after signing)"
    )]
    RegistrySignature,
    /// The registry's own validity has ended.
    #[error("the registry expired at {valid_until_ms} (unix ms); it is now {now_ms}")]
    RegistryExpired { valid_until_ms: u64, now_ms: u64 },
    /// Two entries name the same node.
    #[error("the registry lists node {0} more than once")]
    DuplicateNode(NodeId),
    /// Two entries share a key.
    #[error("nodes {first} and {second} have the same {which} key")]
    DuplicateKey {
        first: NodeId,
        second: NodeId,
        which: &'static str,
    },
    /// A node's signing key is the registry key itself.
    #[error(
        "node {0}'s signing key is the registry key; the IG leads' key must sign registries only"
    )]
    RegistryKeyIsNodeKey(NodeId),
    /// A node entry whose validity window is empty.
    #[error(
        "node {node}'s validity window is empty (valid_from_ms {from} >= valid_until_ms {until})"
    )]
    EmptyValidity { node: NodeId, from: u64, until: u64 },
    /// A node the registry does not list (or lists outside its validity window).
    #[error("node {0} is not in the registry (or not valid now)")]
    NotInRegistry(NodeId),
    /// The registry lists this node with other keys than the identity file holds.
    #[error("the registry lists node {0} with other keys than this node's identity file")]
    IdentityMismatch(NodeId),

    // ----- frames -----
    /// A frame larger than [`crate::MAX_FRAME_BYTES`], refused before any cryptography.
    #[error("frame is {bytes} bytes; at most {max}")]
    FrameTooLarge { bytes: usize, max: usize },
    /// A frame whose parts have the wrong length.
    #[error("malformed frame: {0}")]
    MalformedFrame(String),
    /// A header whose sender and recipient are the same node.
    #[error("frame from {0} is addressed to itself")]
    SelfAddressed(NodeId),
    /// The frame is addressed to another node.
    #[error("frame is addressed to {to}, not to this node ({me})")]
    WrongRecipient { to: NodeId, me: NodeId },
    /// The frame names another federation.
    #[error("frame is for federation {got:?}, expected {expected:?}")]
    WrongFederation { expected: String, got: String },
    /// The frame's sender is not in the registry.
    #[error("frame claims to come from {0}, which is not in the registry")]
    UnknownSender(NodeId),
    /// The signature is not the registered key's for the sender over this frame.
    #[error(
        "frame signature does not verify under {from}'s registered key (forged, altered or signed by another key)"
    )]
    BadSignature { from: NodeId },
    /// HPKE refused to open the frame: not sealed to this node's key, or altered.
    #[error("frame from {from} does not decrypt (not sealed to this node's key, or altered)")]
    DecryptFailed { from: NodeId },
    /// HPKE refused to seal (the recipient's key is a low-order point).
    #[error("cannot seal to {to}: {reason}")]
    SealFailed { to: NodeId, reason: String },

    // ----- sessions and ordering -----
    /// The frame is for another protocol.
    #[error("frame is for protocol {got}, expected {expected}")]
    WrongProtocol { expected: Protocol, got: Protocol },
    /// The frame is for another session (spliced from another run).
    #[error("frame from {from} belongs to another session")]
    WrongSession { from: NodeId },
    /// The frame is for another query.
    #[error("frame from {from} belongs to another query")]
    WrongQuery { from: NodeId },
    /// A sender (or recipient) that is not a peer of this session.
    #[error("{0} is not a peer of this session")]
    NotAPeer(NodeId),
    /// A frame at or before a position already accepted.
    #[error("frame {round}.{seq} from {from} was replayed (already past it)")]
    Replayed { from: NodeId, round: u32, seq: u32 },
    /// A frame ahead of the next expected position: something was dropped or reordered.
    #[error(
        "frame {round}.{seq} from {from} is out of order; expected {expected_round}.{expected_seq}"
    )]
    OutOfOrder {
        from: NodeId,
        round: u32,
        seq: u32,
        expected_round: u32,
        expected_seq: u32,
    },
    /// A frame after the sender's `last` frame of its last round.
    #[error("frame {round}.{seq} from {from} came after its last frame")]
    AfterLast { from: NodeId, round: u32, seq: u32 },
    /// A round outside the session's rounds.
    #[error("frame from {from} is in round {round}; this session has rounds {first}..={last}")]
    RoundOutOfRange {
        from: NodeId,
        round: u32,
        first: u32,
        last: u32,
    },
    /// A round that would need more than `u32::MAX` frames.
    #[error("frame from {from} has sequence number {seq} and is not the last of its round")]
    SequenceExhausted { from: NodeId, seq: u32 },
    /// An earlier frame was refused, so the session refuses everything.
    #[error("this session already refused a frame ({0}) and accepts no more")]
    SessionAborted(String),
    /// The outbox was asked to send out of order.
    #[error("cannot send a round {round} frame to {to}: {reason}")]
    SendOutOfOrder {
        to: NodeId,
        round: u32,
        reason: &'static str,
    },
    /// A session set up with an inconsistent context.
    #[error("invalid session: {0}")]
    InvalidSession(String),
    /// A cohort that names a node twice.
    #[error("the cohort names {0} more than once")]
    DuplicateCohortMember(NodeId),
    /// A session nonce of the wrong length.
    #[error("session nonce is {len} bytes; it must be {min} to {max}")]
    BadNonce { len: usize, min: usize, max: usize },
}

/// One problem in an identity file, with its 1-based line where there is one.
///
/// Messages name the line and the field but never repeat a value: the file holds secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityFileError {
    /// A line that is neither blank, a `#` comment, nor `key = value`.
    #[error("identity file line {line}: expected `key = \"value\"`, a `#` comment or a blank line")]
    Syntax { line: usize },
    /// A key this format does not have.
    #[error("identity file line {line}: unknown field `{field}`")]
    UnknownField { line: usize, field: String },
    /// A key given twice.
    #[error("identity file line {line}: field `{field}` is given twice")]
    DuplicateField { line: usize, field: &'static str },
    /// A key that is missing.
    #[error("identity file: field `{field}` is missing")]
    MissingField { field: &'static str },
    /// `version` is not the first field or not a version this code reads.
    #[error("identity file line {line}: {reason}")]
    Version { line: usize, reason: String },
    /// A value of the wrong shape.
    #[error("identity file line {line}, field `{field}`: {reason}")]
    BadValue {
        line: usize,
        field: &'static str,
        reason: String,
    },
}
