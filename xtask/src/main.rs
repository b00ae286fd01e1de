//! Developer and CI automation: `cargo xtask setup | build | run | test | bench | demo | lint`.

mod setup;

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "resil's developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: rust-src, bpf-linker, bpffs, Debian packages.
    Setup,
    /// Build the BPF programs and the `resil` binary.
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build (release) and start `resil daemon` with ARGS (Ctrl-C stops it).
    Run {
        /// Arguments for `resil daemon`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build and run every test, unit and privileged.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Run the benchmarks (release build): target/bench/report.md and report.json.
    Bench {
        /// A short run: fewer repetitions, shorter traffic.
        #[arg(long)]
        quick: bool,
    },
    /// A self-contained lab, live in the terminal: resil detects, fast-fails and recovers.
    Demo,
    /// cargo fmt --check and cargo clippy on the host crates.
    Lint,
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build(release)
        }
        Task::Run { args } => {
            setup::run()?;
            build(true)?;
            let bin = root.join("target/release/resil");
            eprintln!(
                "xtask: starting {} daemon {}",
                bin.display(),
                args.join(" ")
            );
            // Become the daemon, so Ctrl-C reaches it directly and it detaches cleanly.
            let error = Command::new(&bin).arg("daemon").args(&args).exec();
            Err(error).with_context(|| format!("cannot start {}", bin.display()))
        }
        Task::Test { filter } => {
            setup::run()?;
            build(false)?;
            let mut cmd = cargo();
            cmd.args(["test", "--no-fail-fast"])
                .env("RESIL_BIN", root.join("target/debug/resil"));
            if let Some(filter) = filter {
                cmd.arg(filter);
            }
            test(&mut cmd)
        }
        Task::Demo => {
            setup::run()?;
            let bin = lab_tool(&root, "resil-demo", &["resil-connect"])?;
            let error = Command::new(&bin)
                .env("RESIL_BIN", root.join("target/release/resil"))
                .exec();
            Err(error).with_context(|| format!("cannot start {}", bin.display()))
        }
        Task::Bench { quick } => {
            setup::run()?;
            check(cargo().args(["bench", "--package", "resil-user", "--bench", "engine"]))?;
            // The kernel side needs root: labs of namespaces, the real daemon.
            let mut bench = Command::new(lab_tool(&root, "resil-bench", &[])?);
            bench.env("RESIL_BIN", root.join("target/release/resil"));
            if quick {
                bench.arg("--quick");
            }
            check(&mut bench)
        }
        Task::Lint => {
            check(cargo().args(["fmt", "--all", "--", "--check"]))?;
            check(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the release `resil` and the lab binary `name` of the tests crate (with the `also`
/// it starts); returns the path of `name`.
fn lab_tool(root: &Path, name: &str, also: &[&str]) -> Result<PathBuf> {
    build(true)?;
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--package",
        "resil-tests",
        "--bin",
        name,
    ]);
    for bin in also {
        cmd.args(["--bin", bin]);
    }
    check(&mut cmd)?;
    Ok(root.join("target/release").join(name))
}

/// `cargo` from the toolchain running xtask (stable), never a rustup override.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "resil-user", "--bin", "resil"]);
    if release {
        cmd.arg("--release");
    }
    check(&mut cmd)
}

/// Runs `cargo test`, passing its output through, and closes with one line that adds up every
/// test binary's `test result:` line.
fn test(cmd: &mut Command) -> Result<()> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for part in result.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// Runs a command, failing with its name if it does not succeed.
pub fn check(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
