//! The `dev` subcommand.

/// Arguments of `dev`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the subcommand; returns the process exit code.
pub fn run(_args: &Args) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
