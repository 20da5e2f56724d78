//! The errors of this crate: [`DecodeError`] for a malformed message, [`LinkError`] for
//! everything else. No message carries an NHS number, a point, a scalar or a noise draw,
//! so any of them may go into an audit entry as it is.

use phm_relay::RelayError;

use crate::dp::NoiseError;
use crate::wire::MessageKind;

/// Why a round message (or one chunk of it) was refused on receipt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the chunk ends early (at byte {at})")]
    Truncated { at: usize },
    #[error("{extra} bytes follow the end of the chunk")]
    TrailingBytes { extra: usize },
    #[error("encoding version {0} is not supported (this node speaks version 1)")]
    Version(u8),
    #[error("message kind {0} is unknown")]
    UnknownKind(u8),
    #[error("expected a {expected} message, got {got}")]
    WrongKind {
        expected: MessageKind,
        got: MessageKind,
    },
    #[error("the message says it has {got} groups; this session has {expected}")]
    WrongGroupCount { expected: u32, got: u32 },
    #[error("chunk {got} arrived where chunk {expected} was due")]
    ChunkOrder { expected: u32, got: u32 },
    #[error("a chunk carries {got} elements; at most {max} are allowed")]
    ChunkTooLarge { got: usize, max: usize },
    #[error("the message carries more than {max} elements")]
    TooManyElements { max: usize },
    #[error("group {group} is out of range (the session has {groups} groups)")]
    GroupOutOfRange { group: u32, groups: u32 },
    #[error("group {group} appears after group {previous}: groups must come in order")]
    GroupOrder { previous: u32, group: u32 },
    #[error("a segment of group {group} is empty")]
    EmptySegment { group: u32 },
    #[error("element {index} is not the canonical encoding of a Ristretto point")]
    NonCanonicalPoint { index: usize },
    #[error("element {index} is the identity point")]
    IdentityPoint { index: usize },
    #[error("element {index} repeats an earlier element, which an honest peer never sends")]
    Duplicate { index: usize },
    #[error("the anchor's key share P is missing from the first chunk")]
    MissingKeyShare,
    #[error("a key share P appears in a chunk other than the first")]
    UnexpectedKeyShare,
    #[error("the message has no chunks")]
    Empty,
    #[error("a chunk arrived after the message was complete")]
    AfterEnd,
}

/// Everything that can go wrong in linkage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Noise(#[from] NoiseError),
    #[error("invalid linkage parameters: {0}")]
    Params(String),
    #[error("group {group} is out of range (the query has {groups} groups)")]
    GroupOutOfRange { group: usize, groups: usize },
    #[error(
        "a person has two different group labels: the group key is not person-level, so one person could move two counts"
    )]
    NotPersonLevel,
    #[error("the set has {got} elements; the limit is {max}")]
    SetTooLarge { got: usize, max: usize },
    #[error("the reply for group {group} has {got} elements; {expected} were due")]
    ReplySize {
        group: u32,
        expected: usize,
        got: usize,
    },
    #[error("a frame arrived from {from}, not this session's peer")]
    UnexpectedSender { from: String },
    #[error("a frame of round {got} arrived while round {expected} was due")]
    UnexpectedRound { expected: u32, got: u32 },
    #[error("the round ended before its message was complete")]
    Incomplete,
}
