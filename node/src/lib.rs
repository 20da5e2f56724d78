//! A partner's node: loads its data under its IG policy, answers differentially
//! private aggregate queries, keeps the budget ledger, release cache and audit log,
//! and serves phm.v1.NodeService over mutual TLS.

pub mod audit;
pub mod config;
pub mod engine;
pub mod linkwire;
pub mod metrics;
pub mod peer;
pub mod reload;
pub mod run;
pub mod secwire;
pub mod server;
pub mod service;
pub mod store;
