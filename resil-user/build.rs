//! Builds the BPF programs (`resil-ebpf`) with the nightly toolchain and bpf-linker, so the
//! `resil` binary can embed them. `cargo xtask setup` installs what this needs.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../resil-ebpf");
    let ebpf = Package {
        name: "resil-ebpf",
        root_dir: root,
        ..Default::default()
    };
    // The toolchain that builds the BPF programs: the nightly by default; the image pins a
    // dated one (deploy/Dockerfile) so its LLVM keeps matching bpf-linker's.
    println!("cargo:rerun-if-env-changed=RESIL_BPF_TOOLCHAIN");
    let pinned = std::env::var("RESIL_BPF_TOOLCHAIN").ok();
    let toolchain = match pinned.as_deref() {
        Some(name) if !name.is_empty() => Toolchain::Custom(name),
        _ => Toolchain::Nightly,
    };
    aya_build::build_ebpf([ebpf], toolchain)
        .context("building the BPF programs failed; run `cargo xtask setup` first")
        .map_err(|e| anyhow!("{e:#}"))
}
