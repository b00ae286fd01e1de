//! The command line: `resil daemon` and the client subcommands.

use std::{io::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

use crate::{
    api::{self, Request, Response, DEFAULT_SOCKET},
    circuits::ManualAction,
    clock,
    config::Config,
    daemon::{self, DaemonOptions},
    error::usage,
    kubernetes, metrics,
    output::{self, Format},
    pins,
    probes::{TcMode, XdpMode},
};

/// resil: kernel-level network resilience. Sees every TCP connection this node makes or
/// accepts, runs a circuit breaker per endpoint and tells which dependency fails, and how.
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
    /// Show per-endpoint connection health and breaker states.
    Status(ClientArgs),
    /// Show breaker transitions and findings as they happened, oldest first.
    Events(EventsArgs),
    /// Report what is unhealthy now, grouped by failure domain, worst first.
    Report(ClientArgs),
    /// Force a circuit open (FORCED_OPEN): refuse new connections until `resil reset`.
    Trip(ManualArgs),
    /// Close a circuit with fresh figures (also ends FORCED_OPEN and DISABLED).
    Reset(ManualArgs),
    /// Disable a circuit: never refuse, ignore outcomes, until `resil reset`.
    Disable(ManualArgs),
    /// Check a configuration file, or show which policy applies to an endpoint.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `resil config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE; exit 2 with the line, key and what was expected if it is invalid.
    Check {
        /// The configuration file.
        file: PathBuf,
    },
    /// Show the policy that applies to ENDPOINT (like 10.0.3.7:5432 or [fd00::7]:443) and why.
    Explain {
        /// The endpoint.
        endpoint: String,
        /// Configuration file. Default: /etc/resil/resil.toml when present, else built-in.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
    },
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

/// `resil events` arguments.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen, until interrupted.
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `resil trip|reset|disable` arguments.
#[derive(Debug, Args)]
pub struct ManualArgs {
    /// An endpoint (10.0.3.7:5432, [fd00::7]:443) or the name of a dependency.
    pub target: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `resil daemon` options.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Interface to observe (repeatable). Default: the interface of the default route.
    #[arg(long = "iface", value_name = "IF")]
    pub interfaces: Vec<String>,
    /// Configuration file. Default: /etc/resil/resil.toml when present, else built-in defaults.
    /// SIGHUP reloads it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The API socket to create (mode 0600, or 0660 with --socket-group).
    #[arg(long, env = "RESIL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Let this group's members use the socket (the CLI needs nothing else). The daemon must
    /// be in the group or have CAP_CHOWN.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// bpffs directory where maps and links are pinned: a restart adopts them, so counters,
    /// circuits and verdicts survive.
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Name endpoints after the pods and services that have their addresses, from the
    /// Kubernetes API (needs list and watch on pods and services).
    #[arg(long)]
    pub kubernetes_names: bool,
    /// The Kubernetes API server, like https://10.96.0.1:443. Default: the in-cluster
    /// KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT.
    #[arg(long, value_name = "URL", requires = "kubernetes_names")]
    pub kubernetes_api: Option<String>,
    /// Directory with the service account's `token` and `ca.crt`.
    #[arg(long, value_name = "DIR", default_value = kubernetes::DEFAULT_CREDENTIALS)]
    pub kubernetes_credentials: PathBuf,
    /// Detach and remove everything pinned under --pin-dir, then exit (uninstall). Refused
    /// while a daemon uses it.
    #[arg(long)]
    pub cleanup: bool,
    /// cgroup v2 directory whose processes' connect() calls are refused for open circuits.
    /// Default: the cgroup v2 root (every process).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Kernel-side log level (off, error, warn, info, debug, trace); masked at load time.
    #[arg(long, value_name = "LEVEL", default_value = "off")]
    pub bpf_log: LevelFilter,
    /// How to attach the XDP ingress observer: native where the driver can, else generic.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,
    /// How to attach the TC egress observer: a TCX link where the kernel has it (6.6+), else
    /// a filter on the clsact qdisc.
    #[arg(long, value_enum, default_value_t = TcMode::Auto)]
    pub tc_mode: TcMode,
    /// Where to serve Prometheus metrics (/metrics), liveness (/healthz) and readiness (/readyz),
    /// or `off`.
    #[arg(long, value_name = "ADDR", default_value = metrics::DEFAULT_ADDR, value_parser = parse_metrics_addr)]
    pub metrics: MetricsAddr,
}

/// `--metrics`: an address, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "off" {
        return Ok(MetricsAddr(None));
    }
    text.parse().map(|a| MetricsAddr(Some(a))).map_err(|_| {
        format!("expected an address like 127.0.0.1:9464 or [::1]:9464, or off; not `{text}`")
    })
}

/// `resil daemon --cleanup`: detaches and removes the pinned state.
fn cleanup(args: &DaemonArgs) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(&args.socket).is_ok() {
        bail!(
            "a resil daemon is running on {}: stop it before cleaning up",
            args.socket.display()
        );
    }
    let removed = pins::cleanup(&args.pin_dir)?;
    if removed.links.is_empty() && removed.maps == 0 {
        println!("nothing pinned under {}", args.pin_dir.display());
    } else {
        println!(
            "removed {}: {} attachments detached ({}), {} maps",
            args.pin_dir.display(),
            removed.links.len(),
            removed.links.join(", "),
            removed.maps
        );
    }
    Ok(())
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
        Command::Daemon(args) if args.cleanup => cleanup(&args),
        Command::Daemon(args) => daemon::run(DaemonOptions {
            interfaces: args.interfaces,
            config: args.config,
            socket: args.socket,
            socket_group: args.socket_group,
            pin_dir: args.pin_dir,
            kubernetes: args
                .kubernetes_names
                .then_some((args.kubernetes_api, args.kubernetes_credentials)),
            cgroup: args.cgroup,
            bpf_log: args.bpf_log,
            xdp_mode: args.xdp_mode,
            tc_mode: args.tc_mode,
            metrics: args.metrics.0,
        }),
        Command::Trip(args) => manual(args, ManualAction::Trip),
        Command::Reset(args) => manual(args, ManualAction::Reset),
        Command::Disable(args) => manual(args, ManualAction::Disable),
        Command::Status(args) => match call(&args, Request::Status)? {
            Response::Status(report) => print(output::status(&report, args.output)),
            other => unexpected(other),
        },
        Command::Events(args) => events(&args),
        Command::Report(args) => match call(&args, Request::Report)? {
            Response::Report(report) => {
                print(output::report(&report, args.output, clock::unix_now()))
            }
            other => unexpected(other),
        },
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(Some(&file))?;
            println!(
                "{}: valid ({} {})",
                file.display(),
                config.policies.dependencies.len(),
                if config.policies.dependencies.len() == 1 {
                    "dependency"
                } else {
                    "dependencies"
                }
            );
            Ok(())
        }
        Command::Config(ConfigCommand::Explain {
            endpoint,
            config,
            output: format,
        }) => {
            let endpoint: SocketAddr = endpoint.parse().map_err(|_| {
                usage(format!(
                    "`{endpoint}` is not an endpoint like 10.0.3.7:5432 or [fd00::7]:443"
                ))
            })?;
            let config = Config::load(config.as_deref())?;
            print(output::explain(&config, endpoint, format))
        }
    }
}

/// How often `resil events --follow` asks for new events.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

fn events(args: &EventsArgs) -> Result<()> {
    let mut after = None;
    let mut boot = None;
    let mut out = std::io::stdout().lock();
    loop {
        let report = match call(&args.client, Request::Events { after })? {
            Response::Events(report) => report,
            other => return unexpected(other),
        };
        if boot.is_some_and(|b| b != report.boot) {
            // A new daemon numbers its events from 1 again: start over with its history.
            eprintln!("resil: the daemon restarted; its events follow");
            boot = Some(report.boot);
            after = None;
            continue;
        }
        boot = Some(report.boot);
        if report.lost > 0 {
            eprintln!(
                "resil: {} events were missed: the daemon keeps the last {}",
                report.lost,
                crate::events::CAPACITY
            );
        }
        for event in &report.events {
            let line = output::event_line(event, args.client.output);
            // A closed pipe (`| head`) ends the stream quietly.
            if writeln!(out, "{line}").is_err() {
                return Ok(());
            }
            after = Some(event.seq);
        }
        if out.flush().is_err() || !args.follow {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
}

fn manual(args: ManualArgs, action: ManualAction) -> Result<()> {
    let request = Request::Manual {
        action,
        target: args.target,
    };
    match call(&args.client, request)? {
        Response::Manual(report) => print(output::manual(&report, args.client.output)),
        other => unexpected(other),
    }
}

fn call(args: &ClientArgs, request: Request) -> Result<Response> {
    match api::call(&args.socket, &request)? {
        Response::Error(message) => bail!("the daemon could not answer: {message}"),
        response => Ok(response),
    }
}

fn unexpected(response: Response) -> Result<()> {
    bail!("the daemon answered something else than asked: {response:?}")
}

fn print(text: String) -> Result<()> {
    println!("{text}");
    Ok(())
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
        let cli = Cli::try_parse_from(["resil", "daemon", "--metrics", "off"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Daemon(DaemonArgs {
                metrics: MetricsAddr(None),
                ..
            })
        ));
        let cli = Cli::try_parse_from(["resil", "daemon"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Daemon(DaemonArgs { metrics: MetricsAddr(Some(a)), .. }) if a.to_string() == "127.0.0.1:9464"
        ));
        let e = Cli::try_parse_from(["resil", "daemon", "--metrics", "9464"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let cli = Cli::try_parse_from(["resil", "status", "-o", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status(ClientArgs {
                output: Format::Json,
                ..
            })
        ));
        let cli = Cli::try_parse_from(["resil", "config", "check", "x.toml"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Config(ConfigCommand::Check { .. })
        ));
        let e = Cli::try_parse_from(["resil", "status", "-o", "yaml"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
