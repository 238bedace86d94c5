//! Tests of the mock upstream itself.
