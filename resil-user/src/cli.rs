//! The command line: `resil daemon` and the client subcommands.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

use crate::{
    api::{self, Request, Response, DEFAULT_SOCKET},
    daemon::{self, DaemonOptions},
    output::{self, Format},
};

/// resil: kernel-level network resilience. Sees every TCP connection this node makes or
/// accepts and tells which dependency fails, and how.
#[derive(Debug, Parser)]
#[command(name = "resil", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the BPF programs, attach them, serve the local API.
    Daemon(DaemonArgs),
    /// Show per-endpoint connection health.
    Status(ClientArgs),
}

/// Options every client subcommand takes.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The daemon's API socket.
    #[arg(long, env = "RESIL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// `resil daemon` options.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Interface to observe (repeatable). Default: the interface of the default route.
    #[arg(long = "iface", value_name = "IF")]
    pub interfaces: Vec<String>,
    /// Configuration file. Default: /etc/resil/resil.toml when present, else built-in defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The API socket to create (mode 0600).
    #[arg(long, env = "RESIL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Kernel-side log level (off, error, warn, info, debug, trace); masked at load time.
    #[arg(long, value_name = "LEVEL", default_value = "off")]
    pub bpf_log: LevelFilter,
}

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Daemon(_) => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    match cli.command {
        Command::Daemon(args) => daemon::run(DaemonOptions {
            interfaces: args.interfaces,
            config: args.config,
            socket: args.socket,
            bpf_log: args.bpf_log,
        }),
        Command::Status(args) => match api::call(&args.socket, &Request::Status)? {
            Response::Status(report) => {
                println!("{}", output::status(&report, args.output));
                Ok(())
            }
            Response::Error(message) => bail!("the daemon could not answer: {message}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_flags() {
        let cli = Cli::try_parse_from([
            "resil", "daemon", "--iface", "a", "--iface", "b", "--socket", "/tmp/s",
        ])
        .unwrap();
        match cli.command {
            Command::Daemon(args) => {
                assert_eq!(args.interfaces, ["a", "b"]);
                assert_eq!(args.bpf_log, LevelFilter::Off);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["resil", "status", "-o", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status(ClientArgs {
                output: Format::Json,
                ..
            })
        ));
        let e = Cli::try_parse_from(["resil", "status", "-o", "yaml"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
