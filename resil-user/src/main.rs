//! The `resil` binary: one executable for the daemon and every client subcommand.
use std::process::ExitCode;

fn main() -> ExitCode {
    match resil_user::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("resil: {error:#}");
            ExitCode::from(resil_user::error::exit_code(&error))
        }
    }
}
