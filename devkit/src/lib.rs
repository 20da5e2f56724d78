//! The development kit: everything that exists to run the federation on one machine
//! without real data or real certificates, shared by `phm demo`, `phm synth`,
//! `phm certs dev` and every test suite, so there is one of each.
//!
//! - [`synth`]: the synthetic Integrated Care System (people, partners, policies,
//!   configurations and the exact reference answers).
//! - [`questions`]: the demo's questions, which the reference answers answer exactly.
//! - [`fixture`]: the one policy fixture of the node's tests and benchmark (the GP
//!   practice sample, narrowed to a test's columns) and the benchmark's data.
//! - [`pki`]: one development PKI (an infrastructure CA, a people CA, leaves by role).
//! - [`postgres`]: a real PostgreSQL server for the warehouse tests and demo.
//! - [`privacy_audit`]: the empirical privacy audit (neighbouring datasets, Clopper–Pearson
//!   lower bounds on ε).
//! - [`launch`]: one local-federation launcher (nodes and a coordinator as processes on
//!   loopback ports chosen at run time).

pub mod fixture;
pub mod launch;
pub mod pki;
pub mod postgres;
pub mod privacy_audit;
pub mod questions;
pub mod synth;
