//! Protocol core of privacy-preserving linkage on NHS number: two-party DH-PSI
//! cardinality over Ristretto255, with the partner's DP noise injected as dummy matches
//! and both sides' set sizes padded, relayed by the coordinator as sealed frames it
//! cannot read. The design is `linkage.md`'s; SECURITY.md has the proof sketch and
//! threat model.
//!
//! Pure, like `phm-policies` and `phm-relay`: no IO, no async, no gRPC, no SQL. The node
//! builds the cohorts (after its filter and opt-outs), supplies the noise and carries the
//! frames; this crate does the rest.
//!
//! * [`NhsNumber`]: normalising, the mod-11 check, `H(x)`.
//! * [`AnchorCohort`] / [`PartnerCohort`]: de-duplicated people, unlinkable records
//!   counted by reason ([`CohortStats`]).
//! * [`Anchor`] → [`AnchorAwaitingF`] → [`AnchorAwaitingR`] → [`LinkedCounts`], and
//!   [`Partner`] → [`PartnerAwaitingL`] → `R`: the rounds as type states.
//! * [`RoundF`], [`RoundL`], [`RoundR`]: the messages and their chunked canonical encoding.
//! * [`LinkSession`] / [`Channel`]: the messages as `phm-relay` frames.
//! * [`LinkNoise`], [`ClampedLaplace`], [`EpsilonSplit`]: noise by interface, and the
//!   calibration math (μ from an exact δ, variance, 95% interval).

mod cohort;
mod dp;
mod error;
mod nhs;
mod protocol;
mod session;
mod wire;

#[cfg(test)]
mod tests;

pub use cohort::{AnchorCohort, CohortStats, PartnerCohort};
pub use dp::{
    Accuracy, ClampedLaplace, EpsilonSplit, LinkNoise, MAX_MU, NoiseError, NoisePurpose,
    SIZE_EPSILON_SHARE,
};
pub use error::{DecodeError, LinkError};
pub use nhs::{HASH_DST, NhsNumber, Unlinkable, with_check_digit};
pub use protocol::{
    Anchor, AnchorAwaitingF, AnchorAwaitingR, LinkParams, LinkedCounts, Partner, PartnerAwaitingL,
};
pub use session::{Channel, Incoming, LinkSession, ROUND_REPLY, ROUND_SETS, Role};
pub use wire::{MAX_CHUNK_ELEMENTS, MessageKind, RoundF, RoundL, RoundR, VERSION};
