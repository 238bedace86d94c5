//! Fuzz target `retry_after`: the property is `spillway::fuzzing::retry_after`'s (see its doc).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| spillway::fuzzing::retry_after(input));
