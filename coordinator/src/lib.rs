//! The ICS coordinator: relays requester-signed queries to every node serving the
//! dataset, combines their noisy answers with honest uncertainty, and reports coverage.
