//! The `api-key-server` binary: parse the subcommand, read settings, serve.

use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;

use api_key_server::settings::Settings;
use api_key_server::{cli, server, telemetry};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "api-key-server",
    version,
    about = "A gateway that lets apps call LLM APIs without holding the provider's API key"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve on 0.0.0.0:$PORT with settings from the `API_KEY_SERVER_*` variables (the default).
    Serve,
    /// Zero-config demo on 127.0.0.1 with generated keys and a local fake upstream.
    Dev(cli::dev::Args),
    /// Mint a short-lived RS256 client token.
    MintJwt(cli::mint_jwt::Args),
    /// Print the HMAC headers of one request.
    Sign(cli::sign::Args),
    /// Show a day's spend per budget scope, read from `REDIS_URL` (settings as for `serve`).
    Budgets(cli::budgets::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(),
        Command::Dev(args) => cli::dev::run(&args),
        Command::MintJwt(args) => cli::mint_jwt::run(&args),
        Command::Sign(args) => cli::sign::run(&args),
        Command::Budgets(args) => cli::budgets::run(&args),
    }
}

fn serve() -> ExitCode {
    let (settings, warnings) = match Settings::from_env() {
        Ok(found) => found,
        Err(error) => {
            eprintln!("api-key-server: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_with_project(settings.log_format, settings.gcp_project_id.as_deref());
    for name in &warnings.unknown_variables {
        tracing::warn!(variable = %name, "unknown setting ignored (a typo?)");
    }
    let runtime = match runtime_builder().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("api-key-server: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let stop = server::shutdown_signal();
        let running = match server::start(settings, IpAddr::V4(Ipv4Addr::UNSPECIFIED)).await {
            Ok(running) => running,
            Err(error) => {
                tracing::error!(%error, "cannot bind the listener");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(address = %running.addr, "listening");
        if let Some(address) = running.metrics_addr {
            // Logged after `listening`, and worded differently, so that whoever looks for
            // the service's address finds the right one first.
            tracing::info!(%address, path = "/metrics", "metrics endpoint ready");
        }
        stop.await;
        running.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// A current-thread runtime when the process may use one CPU (a 1-vCPU Cloud Run instance,
/// or a process pinned to one core: `available_parallelism` honours CPU affinity and cgroup
/// quotas), else one worker per CPU. On one CPU the multi-thread scheduler would still run
/// one worker, paying for cross-thread wake-ups and task stealing it can never use.
fn runtime_builder() -> tokio::runtime::Builder {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
}
