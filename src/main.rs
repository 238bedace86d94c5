//! The `spillway` binary: parse the command line, run, exit with its code.

use std::process::ExitCode;

use clap::Parser;
use spillway::cli::Cli;

fn main() -> ExitCode {
    ExitCode::from(Cli::parse().run() as u8)
}
