//! The phm.v1 wire contract: generated gRPC code, the domain types it converts to and
//! from, and the canonical encoding that requesters sign.

pub mod canonical;
pub mod codec;
pub mod denial;
pub mod keyfile;
pub mod query;
pub mod result;
pub mod signing;
pub mod tls;

/// Code generated from `proto/phm/v1/*.proto`. Only edge modules (servers, clients)
/// should touch these types; domain code uses [`query`].
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("phm.v1");

    /// Encoded `FileDescriptorSet` of phm.v1, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/phm_v1_descriptor.bin"));
}

pub use denial::{Denial, DenialReason};
pub use query::{
    Aggregate, AggregateKind, Aggregation, CompareOp, GroupKey, Literal, Predicate, ProofOp,
    ProtocolError, Purpose, QueryBody, QueryKey, RequesterProof, SignedQuery,
};
