//! The `spillway` binary: parse the command line, run, exit with its code.

use std::process::ExitCode;

use clap::Parser;
use spillway::cli::Cli;

/// glibc's allocator contends on its arena locks under proxy load (many small
/// short-lived buffers across worker threads); mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ExitCode::from(Cli::parse().run() as u8)
}
