//! Integration tests: one crate, so the gateway and its dependencies link once.

mod admin;
mod cache;
mod cli;
mod decisions;
mod distributed_cache;
mod distributed_health;
mod distributed_limits;
mod errors;
mod fuzz_corpus;
mod listener;
mod metrics;
mod mock_selftest;
mod openai_sdk;
#[cfg(feature = "otlp")]
mod otlp;
mod proxy;
mod rate_limits;
mod reload;
mod retries;
mod shutdown;
mod streaming;
mod support;
mod tls;
mod upgrade;
