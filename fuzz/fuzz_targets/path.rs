//! Fuzz target `path`: the property is `spillway::fuzzing::path`'s (see its doc).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| spillway::fuzzing::path(input));
