//! The one error type of this crate.
//!
//! Every refusal a node or the coordinator can make has its own variant, so that the node
//! adapter can write a precise audit entry and map each case to a `Denial` in one place.
//! No message carries secret material: shares, seeds and keys are never formatted.

use phm_relay::{NodeId, RelayError};

/// Which of the five rounds an error arose in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Round {
    /// R0 AdvertiseKeys.
    AdvertiseKeys,
    /// R1 ShareKeys.
    ShareKeys,
    /// R2 MaskedInputCollection.
    MaskedInput,
    /// R3 ConsistencyCheck.
    Consistency,
    /// R4 Unmasking.
    Unmasking,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Round::AdvertiseKeys => "R0 AdvertiseKeys",
            Round::ShareKeys => "R1 ShareKeys",
            Round::MaskedInput => "R2 MaskedInputCollection",
            Round::Consistency => "R3 ConsistencyCheck",
            Round::Unmasking => "R4 Unmasking",
        })
    }
}

/// Everything that can go wrong in a secure aggregation session, on either side.
///
/// Deliberately not `non_exhaustive`: a new variant must be a compile error in the
/// integration's `Denial` mapping.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    // ----- identities, registry, session binding -----
    /// The registry, a frame key or a statement failed in `phm-relay` (unsigned or foreign
    /// registry, node not listed, bad signature, bad nonce, ...).
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The identity passed to a step is not the node this state machine belongs to.
    #[error("this session belongs to {expected}, not {got}")]
    WrongIdentity { expected: NodeId, got: NodeId },
    /// This node is not in the announced cohort.
    #[error("this node ({0}) is not in the announced cohort")]
    NotInCohort(NodeId),
    /// This node already joined a session for the query (one session per node and query, ever).
    #[error(
        "this node already joined session {prior_session} for query {query_id:?}; a query gets one secure aggregation session per node"
    )]
    AlreadyJoined {
        query_id: String,
        prior_session: String,
    },
    /// The participation record does not match this session (the store backs the wrong one).
    #[error("the recorded participation is for another session or query")]
    ParticipationMismatch,

    // ----- parameters (R0) -----
    /// A parameter that the node's policy or the protocol forbids.
    #[error("session parameters refused: {0}")]
    BadParams(String),
    /// The announced noise share is below what this node's own privacy requirement needs.
    #[error(
        "the announced noise share σ = {announced} (lattice units) gives ρ = {rho_got:e} with {honest} honest summands; this node requires ρ ≤ {rho_required:e}"
    )]
    NoiseTooSmall {
        announced: f64,
        honest: u32,
        rho_got: f64,
        rho_required: f64,
    },
    /// σ below ½ in lattice units, where the accountant's bound (KLS21 Thm 1) does not hold.
    #[error(
        "σ = {0} lattice units is below ½, where the distributed discrete Gaussian bound does not apply"
    )]
    SigmaTooSmall(f64),
    /// An accountant or calibration input outside its domain.
    #[error("accountant input invalid: {0}")]
    AccountantInput(String),

    // ----- messages from the coordinator -----
    /// A message in the wrong round or state.
    #[error("{round}: {reason}")]
    Protocol { round: Round, reason: String },
    /// A node that is not a member of the set it must belong to.
    #[error("{round}: {node} is not in {set}")]
    NotAMember {
        round: Round,
        node: NodeId,
        set: &'static str,
    },
    /// The same node appears twice where it may appear once.
    #[error("{round}: {node} appears more than once")]
    Duplicate { round: Round, node: NodeId },
    /// The coordinator relayed other keys for this node than it advertised.
    #[error("R1 ShareKeys: the coordinator relayed other keys for this node than it advertised")]
    OwnKeysSubstituted,
    /// A peer's advertised keys do not carry its valid signature (substituted by the relay).
    #[error("R1 ShareKeys: {0}'s advertised keys are not signed by its registered identity key")]
    KeySignature(NodeId),
    /// Two advertised public keys are equal (a replayed or reflected key).
    #[error("R1 ShareKeys: {0}'s advertised keys repeat a key already seen in this session")]
    RepeatedKey(NodeId),
    /// A key agreement gave the all-zero output: a low-order public key.
    #[error("{0}'s public key is of low order")]
    LowOrderKey(NodeId),
    /// A share ciphertext does not decrypt, or decrypts to shares not meant for this pair.
    #[error(
        "R2 MaskedInputCollection: the share ciphertext from {0} does not open for this node in this session"
    )]
    ShareDecrypt(NodeId),
    /// Fewer than the promised number of survivors: never continue with less noise.
    #[error("{round}: {have} survivors; the session needs at least {need}")]
    TooFewSurvivors {
        round: Round,
        have: usize,
        need: usize,
    },
    /// The survivor set of R3 is not a subset of what this node saw in R2.
    #[error("R3 ConsistencyCheck: {0} is named a survivor but did not share keys with this node")]
    SurvivorNotInU2(NodeId),
    /// This node is left out of the survivor set although it sent its masked input.
    #[error("R3 ConsistencyCheck: this node is missing from the survivor set")]
    SelfNotInU3,
    /// A consistency signature that does not verify on the survivor set this node signed:
    /// the coordinator showed different survivor sets to different nodes.
    #[error("R4 Unmasking: {0}'s signature is not on the survivor set this node signed")]
    InconsistentSurvivorSet(NodeId),
    /// An input outside the range that cannot wrap when N of them are added.
    #[error("value {value} at coordinate {index} is outside ±{bound}: it could wrap the modulus")]
    OutOfRange {
        index: usize,
        value: i128,
        bound: i64,
    },
    /// A vector of the wrong length.
    #[error("vector has {got} coordinates; the layout has {expected}")]
    Dimension { expected: usize, got: usize },
    /// An encoding parameter (lattice factor, fixed-point step) that is invalid.
    #[error("encoding refused: {0}")]
    Encoding(String),

    // ----- coordinator side -----
    /// Shamir reconstruction failed, or reconstructed a key that is not the advertised one.
    #[error("R4 Unmasking: reconstruction of {node}'s {what} failed: {reason}")]
    Reconstruction {
        node: NodeId,
        what: &'static str,
        reason: String,
    },
    /// A node's unmasking response does not reveal exactly the shares the protocol asks for.
    #[error("R4 Unmasking: {0}'s response does not reveal exactly the expected shares")]
    UnexpectedShares(NodeId),
    /// Secret sharing (split) failed.
    #[error("secret sharing failed: {0}")]
    Sharing(String),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),
}
