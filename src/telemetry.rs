//! Logging: a `tracing` subscriber writing one event per line to stdout, as JSON or
//! as human-readable text.

use tracing_subscriber::{EnvFilter, fmt};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    #[default]
    Pretty,
}

/// Installs the global subscriber. `level` is a level (`info`) or a `RUST_LOG`-style
/// filter (`spillway=debug,hyper=warn`); without one, `RUST_LOG` applies, then `info`.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(level).map_err(|error| format!("invalid log level {level:?}: {error}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stdout);
    let installed = match format {
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
        }
        LogFormat::Pretty => builder.try_init(),
    };
    installed.map_err(|error| error.to_string())
}
