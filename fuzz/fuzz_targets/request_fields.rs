//! Fuzz target `request_fields`: the property is `spillway::fuzzing::request_fields`'s (see its doc).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| spillway::fuzzing::request_fields(input));
