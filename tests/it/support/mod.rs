//! Shared support for the integration tests.

pub mod certs;
pub mod gateway;
pub mod raw;
pub mod redis;
pub mod upstream;
