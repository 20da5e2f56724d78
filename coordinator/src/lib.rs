//! The ICS coordinator: relays requester-signed queries to every node serving the
//! dataset, combines their noisy answers with honest uncertainty, and reports coverage.

pub mod cli;
pub mod combine;
pub mod config;
pub mod coordinator;
pub mod fanout;
pub mod history;
pub mod link;
pub mod model;
pub mod rates;
pub mod secure;
pub mod server;
pub mod wire;
