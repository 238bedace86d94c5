//! Fuzz target `sse`: the property is `spillway::fuzzing::sse`'s (see its doc).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| spillway::fuzzing::sse(input));
