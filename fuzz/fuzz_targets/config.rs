//! Fuzz target `config`: the property is `spillway::fuzzing::config`'s (see its doc).

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| spillway::fuzzing::config(input));
