//! Arbitrary text as a JSON rules file: parsing and compiling must return errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sentinel_core::PolicySet;
use sentinel_core::load::parse_rules_json;

fuzz_target!(|src: &str| {
    if let Ok(docs) = parse_rules_json("fuzz.json", "fuzz", src) {
        // Errors are fine; a panic is a bug.
        let _ = PolicySet::compile(docs);
    }
});
