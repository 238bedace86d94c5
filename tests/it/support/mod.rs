//! Shared support for the integration tests.

pub mod certs;
pub mod gateway;
pub mod redis;
pub mod upstream;
