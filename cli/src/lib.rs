//! Library half of the `phm` command, so its parsers and generators can be tested and
//! fuzzed apart from the binary.

pub mod client;
pub mod commands;
pub mod rates;
pub mod registry;
pub mod render;
/// The development kit's synthetic ICS, demo questions and development PKI.
pub use phm_devkit::{pki as certs, questions, synth};
/// Requester key files, from phm-proto.
pub use phm_proto::keyfile as keys;
/// The analysts' SQL subset (the `phm-sql` crate), re-exported for the CLI's users.
pub use phm_sql as sql;
