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
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .context("building the BPF programs failed; run `cargo xtask setup` first")
        .map_err(|e| anyhow!("{e:#}"))
}
