//! Fuzz target: bytes off the wire -> prost-decoded `AggregateQuery` -> validated
//! `SignedQuery` -> canonical signing bytes. No panic, and a validated query must
//! round-trip through the wire type to the same canonical bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phm_proto::SignedQuery;
use phm_proto::proto::AggregateQuery;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = AggregateQuery::decode(data) else {
        return;
    };
    let Ok(query) = SignedQuery::try_from(wire) else {
        return;
    };
    let bytes = query.body.canonical_bytes();
    let again = SignedQuery::try_from(AggregateQuery::from(query.clone()))
        .expect("a validated query must validate again after re-encoding");
    assert_eq!(again.body.canonical_bytes(), bytes);
    let _ = query.body.to_sql();
});
