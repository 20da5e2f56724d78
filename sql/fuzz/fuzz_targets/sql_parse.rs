//! Fuzz target: `phm_sql::parse`
//! on arbitrary UTF-8 must accept or refuse with an in-bounds position, never panic;
//! rendering the error must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;

use phm_sql as sql;

fuzz_target!(|text: &str| {
    match sql::parse(text) {
        Ok(q) => {
            assert!(!q.aggregates.is_empty());
            assert!(!q.dataset.is_empty());
        }
        Err(e) => {
            assert!(
                e.offset <= text.len(),
                "offset {} beyond {}",
                e.offset,
                text.len()
            );
            let _ = e.render(text);
        }
    }
});
