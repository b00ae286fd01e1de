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
];

/// Runs every step.
pub fn run() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)?;
    bpffs()?;
    debian_packages()?;
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
