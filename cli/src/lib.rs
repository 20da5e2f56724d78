//! Library half of the `phm` command, so its parsers and generators can be tested and
//! fuzzed apart from the binary.

pub mod certs;
pub mod client;
pub mod commands;
pub mod keys;
pub mod questions;
pub mod render;
/// The analysts' SQL subset (the `phm-sql` crate), re-exported for the CLI's users.
pub use phm_sql as sql;
pub mod synth;
