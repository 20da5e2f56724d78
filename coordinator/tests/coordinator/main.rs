//! The coordinator's integration tests, as one test binary: fan-out, combining,
//! history and results bound to their requester against mock nodes over mutual TLS
//! (`coordinator`), and disclosure control per row (`disclosure`).
// A failed expectation in a test helper is a test failure: panicking is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod coordinator;
mod disclosure;
