//! Shared support for the integration tests.

pub mod upstream;
