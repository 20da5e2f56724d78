//! End-to-end tests: real `phm-node`, `phm-coordinator` and `phm` processes on loopback
//! ports chosen at run time, over mutual TLS with certificates generated for the test.
//! One binary of modules, so the slow link happens once.

// A failed expectation in a test helper is a test failure: panicking is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod faults;
mod federation;
mod fhir;
mod linkage;
mod node_server;
mod peers;
mod pinning;
mod redteam;
mod secure;
mod tidy;
mod trust;
mod warehouse;

/// A current-thread runtime for the async gRPC clients; the harness itself is blocking.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
