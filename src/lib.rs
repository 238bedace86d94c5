//! spillway: an OpenAI-compatible LLM gateway. Callers point their OpenAI SDK at it;
//! it relays every `/v1/*` request to the right upstream (streams included), and gives
//! every API key its limits, a response cache and retries.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`serve`, `check`, `hash-key`) and exit codes.
//! - [`config`]: TOML → validated [`config::Config`], with file:line:col diagnostics.
//! - [`server`]: listeners (TLS, h1/h2), graceful shutdown, the admin endpoints.
//! - [`pipeline`]: the request path, one module per stage; `pipeline/mod.rs` decides
//!   their order.
//! - [`upstream`]: upstream pools, routing by model, header hygiene.
//! - [`auth`]: identifying the caller by key hash.
//! - [`limit`]: per-key requests, tokens and concurrency limits behind one trait.
//! - [`cache`]: response cache keys (canonical JSON + SHA-256) and stores behind one
//!   trait.
//! - [`openai`]: the few fields of OpenAI's wire format the gateway reads.
//! - [`error`]: gateway errors and the table mapping them to status and code.
//! - [`metrics`]: metric names, the Prometheus recorder, per-request helpers.
//! - [`secret`]: redacted secret types; [`runtime`]: state built from one config.
//! - `fuzzing` (hidden): the properties the fuzz targets and their corpus replay check.
//!
//! # Request path
//!
//! ```text
//! accept ─ TLS ─ h1/h2 ─ observe ─ ingress ─ admit ─ cache ─ retry ─ (forward) ─ upstream
//! ```
//!
//! See [`pipeline`] for what each stage owns.

#![forbid(unsafe_code)]

pub mod auth;
pub mod background;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod limit;
pub mod metrics;
pub mod openai;
pub mod pipeline;
pub mod redis_link;
pub mod runtime;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod upstream;
