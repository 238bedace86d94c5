//! The command line: `serve` (the default), `check` and `hash-key`, the flags that
//! override the config file, and the exit codes (0 clean, 1 bad config, 2 startup).

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{Parser, Subcommand};

use crate::{
    config::{self, Config, Diagnostics, Overrides},
    secret::KeyHash,
    telemetry::{self, LogFormat},
};

/// The config file read when neither `--config` nor `$SPILLWAY_CONFIG` names one.
const DEFAULT_CONFIG_FILE: &str = "spillway.toml";

#[derive(Debug, Parser)]
#[command(
    name = "spillway",
    version,
    about = "An OpenAI-compatible LLM gateway: per-key rate limits, caching and retries."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Config file [default: $SPILLWAY_CONFIG, then ./spillway.toml, then built-in defaults]
    #[arg(long, global = true, env = "SPILLWAY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8080
    #[arg(long, global = true, env = "SPILLWAY_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin address (/metrics, /healthz, /readyz); "" disables it
    #[arg(long, global = true, env = "SPILLWAY_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// One passthrough upstream serving every model, replacing [[upstreams]]
    #[arg(long, global = true, env = "SPILLWAY_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    #[arg(long, global = true, env = "SPILLWAY_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// A level (info, debug…) or a RUST_LOG-style filter [default: $RUST_LOG, then info]
    #[arg(long, global = true, env = "SPILLWAY_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default)
    Serve,
    /// Validate a config: exit 0, or print every error with file:line:column and exit 1
    Check,
    /// Read a key on stdin and print its `sha256:…` hash for `key_hash`
    HashKey,
}

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Clean = 0,
    BadConfig = 1,
    Startup = 2,
}

impl Cli {
    pub fn run(self) -> Exit {
        match self.command {
            Some(Command::HashKey) => hash_key(),
            Some(Command::Check) => self.check(),
            Some(Command::Serve) | None => self.serve(),
        }
    }

    fn check(&self) -> Exit {
        match self.load() {
            Ok((config, _)) => {
                let source = config
                    .source
                    .as_deref()
                    .map_or("built-in defaults".into(), |path| path.display().to_string());
                println!("{source}: ok ({} upstreams, {} keys)", config.upstreams.len(), config.keys.len());
                Exit::Clean
            }
            Err(diagnostics) => {
                eprintln!("{diagnostics}");
                Exit::BadConfig
            }
        }
    }

    fn serve(&self) -> Exit {
        // A worker about to wait for work first writes out the access lines held back.
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime.enable_all().on_thread_park(telemetry::flush);
        let runtime = match runtime.build() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("error: cannot start the async runtime: {error}");
                return Exit::Startup;
            }
        };
        // Inside the runtime: a trace exporter runs on it.
        let telemetry =
            match runtime.block_on(async { telemetry::init(self.log_format, self.log_level.as_deref()) }) {
                Ok(telemetry) => telemetry,
                Err(error) => {
                    eprintln!("error: {error}");
                    return Exit::BadConfig;
                }
            };
        let exit = match self.load() {
            Err(diagnostics) => {
                eprintln!("{diagnostics}");
                Exit::BadConfig
            }
            Ok((config, overrides)) => match runtime.block_on(crate::server::run(config, overrides)) {
                Ok(()) => Exit::Clean,
                Err(error) => {
                    tracing::error!(%error, "startup failed");
                    eprintln!("error: {error}");
                    Exit::Startup
                }
            },
        };
        runtime.block_on(async { telemetry.shutdown() });
        // Blocking work still running (a DNS lookup that hangs) must not hold up the exit.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        exit
    }

    /// The config file (if any) and the overrides, loaded and validated.
    fn load(&self) -> Result<(Config, Overrides), Diagnostics> {
        let overrides = self.overrides()?;
        let config = match &self.config {
            Some(path) => config::load(path, &overrides)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                config::load(Path::new(DEFAULT_CONFIG_FILE), &overrides)?
            }
            None => config::defaults(&overrides),
        };
        Ok((config, overrides))
    }

    fn overrides(&self) -> Result<Overrides, Diagnostics> {
        let mut problems = Vec::new();
        let mut address = |flag: &str, value: &str| match value.parse::<SocketAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                problems
                    .push(config::Diagnostic::whole_file(flag, format!("not a socket address: {value:?}")));
                None
            }
        };
        let listen = self.listen.as_deref().and_then(|value| address("--listen", value));
        let admin_listen = self.admin_listen.as_deref().map(|value| match value {
            "" => None,
            value => address("--admin-listen", value),
        });
        let upstream = self.upstream.as_deref().and_then(|value| match config::parse_base_url(value) {
            Ok(url) => Some(url),
            Err(message) => {
                problems.push(config::Diagnostic::whole_file("--upstream", message));
                None
            }
        });
        if problems.is_empty() {
            Ok(Overrides { listen, admin_listen, upstream })
        } else {
            Err(Diagnostics(problems))
        }
    }
}

/// `spillway hash-key`: one trailing newline is trimmed, nothing else.
fn hash_key() -> Exit {
    let mut key = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut key) {
        eprintln!("error: cannot read stdin: {error}");
        return Exit::BadConfig;
    }
    let key = key.strip_suffix(b"\n").map(|key| key.strip_suffix(b"\r").unwrap_or(key)).unwrap_or(&key);
    if key.is_empty() {
        eprintln!("error: no key on stdin");
        return Exit::BadConfig;
    }
    println!("{}", KeyHash::of(key));
    Exit::Clean
}
