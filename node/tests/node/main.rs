//! The node's integration tests, as one test binary so DataFusion links once: the
//! domain service over a real engine and ledger (`service`), the tonic server over
//! mutual TLS (`grpc`) and kill -9 during spends (`crash`).
// A failed expectation in a test helper is a test failure: panicking is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod crash;
mod grpc;
mod service;
