//! Subcommands besides `serve`: `dev`, `mint-jwt`, `sign` and `budgets`.
//!
//! They are client-side helpers and a demo: they read key files and secrets the user
//! names, and must never print key material or a secret that came from outside (the
//! ephemeral secrets `dev` generates are the one exception: showing them is their point).
//! `budgets` is the operator's: it reads the server's settings and its Redis, and shows
//! the Redis URL only without its user info.
//! Everything they print to stdout goes through [`output`].

pub mod budgets;
pub mod dev;
pub mod fake_upstream;
pub mod mint_jwt;
pub mod sign;

use std::process::ExitCode;

/// Exit code of a usage or input error (as clap's own parse errors).
const USAGE_ERROR: u8 = 2;

/// Prints one error line on stderr and returns the usage-error exit code.
fn fail(command: &str, message: &str) -> ExitCode {
    eprintln!("api-key-server {command}: {message}");
    ExitCode::from(USAGE_ERROR)
}

/// The subcommands' stdout: the only place that writes to it directly.
pub mod output {
    use std::io::Write;

    /// Writes `text` and a newline in one go, so that lines of a banner are not split by
    /// log lines written concurrently. A closed stdout (`| head`) is not an error worth a
    /// panic, so write errors are ignored (which is why this is not `println!`).
    pub fn line(text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    }
}
