//! The `phm` command's integration tests, as one test binary so DataFusion links once:
//! the commands against real processes.
// A failed expectation in a test helper is a test failure: panicking is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod commands;
