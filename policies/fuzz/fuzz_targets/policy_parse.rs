//! Fuzz target: `Policy::parse` on arbitrary UTF-8 must return a policy or located
//! errors, never panic, hang or exhaust memory. Errors must point inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match phm_policies::Policy::parse("fuzz.toml", text) {
        Ok(policy) => {
            // A valid policy must also render its version and schema-checked parts.
            assert_eq!(policy.version().len(), 64);
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result must carry an error");
            let lines = text.split('\n').count();
            for e in &errors.0 {
                assert!(e.line >= 1 && e.line <= lines, "line {} of {lines}", e.line);
                assert!(e.column >= 1);
            }
            let _ = errors.to_string();
        }
    }
});
