//! Runs a program the way a container runtime runs an image's entrypoint, for the tests of
//! what the image in deploy/Dockerfile needs: a mount namespace of its own whose root is a
//! given directory (made read-only), host directories bind-mounted at the same paths (the
//! DaemonSet's hostPath volumes), only the named capabilities, and no new privileges.
//!
//! `resil-container --root DIR [--bind PATH]... --caps CAP[,CAP]... --entrypoint PATH -- HOST_PROGRAM [ARG]...`
//!
//! HOST_PROGRAM, the command's first word, is dropped and PATH (inside DIR) runs with the
//! arguments, so the tests' daemon launcher can wrap its usual command line.

use std::{ffi::CString, path::PathBuf};

use nix::{
    mount::{mount, MsFlags},
    sched::{unshare, CloneFlags},
    unistd::{chdir, chroot, execv},
};

/// The capabilities a test may name, by their number in linux/capability.h.
const CAPS: [(&str, u64); 3] = [("net_admin", 12), ("perfmon", 38), ("bpf", 39)];

struct Options {
    root: PathBuf,
    binds: Vec<PathBuf>,
    caps: Vec<u64>,
    entrypoint: String,
    args: Vec<String>,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "resil-container: {problem}\nusage: resil-container --root DIR [--bind PATH]... \
         --caps CAP[,CAP]... --entrypoint PATH -- HOST_PROGRAM [ARG]..."
    );
    std::process::exit(2);
}

fn parse(mut args: impl Iterator<Item = String>) -> Options {
    let (mut root, mut binds, mut caps, mut entrypoint) = (None, Vec::new(), None, None);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--root" => root = Some(PathBuf::from(value())),
            "--bind" => binds.push(PathBuf::from(value())),
            "--caps" => {
                let names = value();
                caps = Some(
                    names
                        .split(',')
                        .map(|name| {
                            CAPS.iter()
                                .find(|(known, _)| *known == name)
                                .map(|(_, number)| *number)
                                .unwrap_or_else(|| usage(&format!("unknown capability {name}")))
                        })
                        .collect(),
                )
            }
            "--entrypoint" => entrypoint = Some(value()),
            "--" => break,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let _host_program = args.next().unwrap_or_else(|| usage("no program after --"));
    Options {
        root: root.unwrap_or_else(|| usage("--root is required")),
        binds,
        caps: caps.unwrap_or_else(|| usage("--caps is required")),
        entrypoint: entrypoint.unwrap_or_else(|| usage("--entrypoint is required")),
        args: args.collect(),
    }
}

fn fail(what: &str, error: impl std::fmt::Display) -> ! {
    eprintln!("resil-container: {what}: {error}");
    std::process::exit(1);
}

fn main() {
    let options = parse(std::env::args().skip(1));
    let last_cap: u64 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap_or_else(|e| fail("reading cap_last_cap", e))
        .trim()
        .parse()
        .unwrap_or_else(|e| fail("parsing cap_last_cap", e));

    unshare(CloneFlags::CLONE_NEWNS).unwrap_or_else(|e| fail("unshare", e));
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .unwrap_or_else(|e| fail("making / private", e));
    // The root as a mount of its own, so it can be read-only while the binds under it are not.
    let root = &options.root;
    mount(Some(root), root, none, MsFlags::MS_BIND, none)
        .unwrap_or_else(|e| fail("binding the root", e));
    for host in &options.binds {
        let inside = root.join(host.strip_prefix("/").unwrap_or(host));
        std::fs::create_dir_all(&inside).unwrap_or_else(|e| fail("making a mount point", e));
        mount(
            Some(host),
            &inside,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .unwrap_or_else(|e| fail(&format!("binding {}", host.display()), e));
    }
    mount(
        none,
        root,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        none,
    )
    .unwrap_or_else(|e| fail("making the root read-only", e));
    chroot(root).unwrap_or_else(|e| fail("chroot", e));
    chdir("/").unwrap_or_else(|e| fail("chdir", e));

    // uid 0 gets its bounding set as permitted and effective capabilities at exec.
    for cap in (0..=last_cap).filter(|cap| !options.caps.contains(cap)) {
        // SAFETY: prctl with PR_CAPBSET_DROP takes plain integers and touches no memory.
        if unsafe { nix::libc::prctl(nix::libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            fail(
                &format!("dropping capability {cap}"),
                std::io::Error::last_os_error(),
            );
        }
    }
    nix::sys::prctl::set_no_new_privs().unwrap_or_else(|e| fail("no_new_privs", e));

    let program = CString::new(options.entrypoint.clone()).unwrap_or_else(|e| fail("path", e));
    let mut argv = vec![program.clone()];
    for arg in &options.args {
        argv.push(CString::new(arg.as_str()).unwrap_or_else(|e| fail("argument", e)));
    }
    let Err(error) = execv(&program, &argv);
    fail(&format!("exec {}", options.entrypoint), error)
}
