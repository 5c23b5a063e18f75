//! Arbitrary text as a YAML policy file: parsing and compiling must return errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sentinel_core::PolicySet;
use sentinel_core::load::parse_yaml;

fuzz_target!(|src: &str| {
    if let Ok(docs) = parse_yaml("fuzz.yaml", "fuzz", src) {
        // Errors are fine; a panic is a bug.
        let _ = PolicySet::compile(docs);
    }
});
