//! Secure aggregation with distributed noise: the coordinator learns only the system total,
//! and each node adds only a share of the noise.
//!
//! Pure, like `phm-policies` and `phm-relay`: no IO, no async, no gRPC. The node and
//! coordinator adapters carry the messages on their streams, spend and audit through the
//! node's store, and sample the noise share with the engine's OpenDP discrete Gaussian.
//!
//! * [`client`]: the node's state machine of Bonawitz et al.'s active protocol (CCS 2017),
//!   rounds R0 AdvertiseKeys to R4 Unmasking, one typed state per round, with an explicit
//!   "record the spend now" step before the masked input exists.
//! * [`Server`]: the coordinator's state machine: collects, forwards, fixes U1..U5,
//!   reconstructs, strips masks and decodes the total; never unmasks fewer than t_noise.
//! * [`Encoding`]: fixed point γ, lattice factor g, two's complement into Z_2^64.
//! * [`accountant`]: Kairouz–Liu–Steinke's distributed discrete Gaussian bound and the
//!   calibration of g and σ_share.
//! * [`admit_session`] / [`admit_spend`]: one session per (node, query id), ever.
//!
//! Identities, the IG-signed registry, the session id and statement signatures are
//! `phm-relay`'s: the one identity scheme shared with linkage. PROTOCOL.md beside this
//! crate describes the protocol as built and its threat model.

pub mod accountant;
mod canon;
pub mod client;
mod crypto;
mod encoding;
mod error;
mod messages;
mod params;
mod participation;
mod prg;
mod server;
#[cfg(feature = "wire")]
pub mod wire;

#[cfg(test)]
mod tests;

pub use crypto::{SHARE_CIPHERTEXT_LEN, SHARE_LEN, Share};
pub use encoding::{Encoding, MAX_ABS_TOTAL};
pub use error::{Round, SecAggError};
pub use messages::{
    AdvertiseKeys, ConsistencySig, EncryptedShares, ForwardedShares, MaskedInput, PeerKeys,
    ShareKeys, SurvivorSet, UnmaskRequest, UnmaskShares,
};
pub use params::{Begin, MAX_COHORT, NodePolicy, SessionParams};
pub use participation::{Participation, Stage, admit_session, admit_spend};
pub use server::{Server, Total};
