//! The daemon's life: it attaches and pins, a stop leaves the pinned state for the next start,
//! `--cleanup` removes it all; it runs with only its documented capabilities, and refuses bad
//! input with clear sentences and the documented exit codes.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use resil_tests::{in_netns, resil_bin, sh, target_bin, Daemon, Lab};

/// What is attached to the lab's client interface, as the kernel reports it: TCX programs
/// (names cut to 15 characters by the kernel), the XDP program, qdiscs and classic TC filters.
fn attachments(lab: &Lab) -> String {
    let ns = &lab.client_ns;
    let ifname = &lab.client_if;
    let mut out = in_netns(ns, || {
        let mut names = String::new();
        for point in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, programs) = SchedClassifier::query_tcx(ifname, point).expect("query TCX");
            for p in programs {
                names += &format!("tcx {point:?}: {}\n", p.name_as_str().unwrap_or("?"));
            }
        }
        names
    });
    // `ip link` names the XDP program: "prog/xdp id 7 name resil_xdp_ingr …".
    let link = sh("ip", &["-n", ns, "-d", "link", "show", "dev", ifname]).unwrap_or_default();
    if let Some(at) = link.find("prog/xdp") {
        out += &format!("xdp: {}\n", &link[at..]);
    }
    for args in [
        vec!["-n", ns, "qdisc", "show", "dev", ifname],
        vec!["-n", ns, "filter", "show", "dev", ifname, "ingress"],
        vec!["-n", ns, "filter", "show", "dev", ifname, "egress"],
    ] {
        // `filter show` fails without a clsact qdisc: that also means no filter.
        out += &sh("tc", &args).unwrap_or_default();
    }
    out
}

/// The programs resil has on the lab's cgroup, as bpftool lists them.
fn cgroup_programs(lab: &Lab) -> String {
    sh(
        "bpftool",
        &["cgroup", "show", &lab.cgroup.to_string_lossy()],
    )
    .unwrap_or_default()
}

#[test]
fn a_stop_keeps_everything_pinned_and_cleanup_removes_it_all() {
    let lab = Lab::new("lc").unwrap();
    let before = attachments(&lab);
    assert!(!before.contains("resil"), "{before}");
    let mut daemon = lab.daemon().unwrap();
    let during = attachments(&lab);
    assert!(
        during.contains("resil_xdp_ingr") && during.contains("Egress: resil_tc_egress"),
        "programs not attached:\n{during}"
    );
    assert!(cgroup_programs(&lab).contains("resil_connect4"));
    let socket = daemon.socket.clone();
    let status = daemon.stop().unwrap();
    assert!(status.success(), "daemon exited with {status}");
    assert!(!socket.exists(), "socket left behind");
    // Stopped, the programs still observe (and enforce, until verdicts expire).
    let after_stop = attachments(&lab);
    assert!(
        after_stop.contains("resil_xdp_ingr") && after_stop.contains("resil_tc_egress"),
        "a stop detached:\n{after_stop}"
    );
    let links: Vec<String> = std::fs::read_dir(daemon.pin_dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(links.len(), 4, "{links:?}");
    assert!(daemon.pin_dir.join("maps/v1/ENDPOINTS").exists());

    let out = daemon.cleanup().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("4 attachments detached"), "{said}");
    let after = attachments(&lab);
    assert!(!after.contains("resil"), "left attached:\n{after}");
    assert!(!after.contains("clsact"), "left a qdisc:\n{after}");
    let cgroup = cgroup_programs(&lab);
    assert!(!cgroup.contains("resil"), "left on the cgroup:\n{cgroup}");
    assert!(!daemon.pin_dir.exists(), "pin directory left behind");
    // Twice is harmless.
    let out = daemon.cleanup().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing pinned"));
}

/// How many classic TC filters of resil's are on the lab's client interface, on egress.
fn clsact_filters(lab: &Lab) -> usize {
    let args = [
        "-n",
        &lab.client_ns,
        "filter",
        "show",
        "dev",
        &lab.client_if,
        "egress",
    ];
    sh("tc", &args)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("resil_tc_egress"))
        .count()
}

/// The records of classic TC filters in the daemon's pin directory.
fn filter_records(daemon: &Daemon) -> usize {
    std::fs::read_dir(daemon.pin_dir.join("links"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("tc-filter@"))
                .count()
        })
        .unwrap_or(0)
}

/// Kernels before 6.6 have no TCX: the egress observer is a classic filter, which cannot be
/// pinned. It stays attached across stops and crashes all the same, is replaced (not added
/// to) at each start, gives way to a TCX link and back, and `--cleanup` detaches it.
#[test]
fn a_clsact_filter_stays_across_restarts_and_cleanup_detaches_it() {
    use nix::sys::signal::Signal;
    let lab = Lab::new("cf").unwrap();
    let clsact = ["--tc-mode", "clsact"];
    let mut daemon = lab.daemon_with_args("", &clsact).unwrap();
    let one_filter = |daemon: &Daemon, when: &str| {
        let seen = attachments(&lab);
        assert_eq!(
            clsact_filters(&lab),
            1,
            "{when}:\n{seen}\n{}",
            daemon.log_text()
        );
        assert!(
            !seen.contains("Egress: resil_tc_egress"),
            "{when}: a TCX link too:\n{seen}"
        );
        assert_eq!(filter_records(daemon), 1, "{when}");
    };
    one_filter(&daemon, "started");
    assert!(
        daemon.log_text().contains("TC clsact"),
        "{}",
        daemon.log_text()
    );
    daemon.stop().unwrap();
    one_filter(&daemon, "stopped");
    daemon.start_again().unwrap();
    one_filter(&daemon, "started again");
    daemon.restart(Signal::SIGKILL).unwrap();
    one_filter(&daemon, "after a crash");

    daemon.restart_with_args(&["--tc-mode", "tcx"]).unwrap();
    let seen = attachments(&lab);
    assert!(seen.contains("Egress: resil_tc_egress"), "{seen}");
    assert_eq!(clsact_filters(&lab), 0, "{seen}");
    assert_eq!(filter_records(&daemon), 0);
    daemon.restart_with_args(&clsact).unwrap();
    one_filter(&daemon, "back from TCX");

    daemon.stop().unwrap();
    let out = daemon.cleanup().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = attachments(&lab);
    assert!(!after.contains("resil"), "left attached:\n{after}");
    assert!(!daemon.pin_dir.exists(), "pin directory left behind");
}

#[test]
fn cleanup_is_refused_while_the_daemon_runs() {
    let lab = Lab::new("cr").unwrap();
    let daemon = lab.daemon().unwrap();
    let out = Command::new(resil_bin())
        .args(["daemon", "--cleanup", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .arg("--socket")
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stop it before cleaning up"), "{err}");
    // Through another socket path, the directory's lock still says no.
    let out = daemon.cleanup().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another resil daemon is using"), "{err}");
    daemon.status();
    assert!(attachments(&lab).contains("resil_xdp_ingr"));
}

#[test]
fn a_second_daemon_on_the_same_socket_fails_and_leaves_the_first_alone() {
    let lab = Lab::new("d2").unwrap();
    let first = lab.daemon().unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.client_ns))
        .arg(resil_bin())
        .args(["daemon", "--iface", &lab.client_if, "--socket"])
        .arg(&first.socket)
        .arg("--cgroup")
        .arg(&lab.cgroup)
        .arg("--pin-dir")
        .arg(lab.dir.join("never-used"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already running"), "{err}");
    // The loser detached what it had attached; the first daemon is intact and answering.
    let now = attachments(&lab);
    assert_eq!(
        (
            now.matches("resil_tc").count(),
            now.matches("resil_xdp").count()
        ),
        (1, 1),
        "one program each way:\n{now}"
    );
    assert!(first.socket.exists());
    first.status();
}

fn resil(args: &[&str]) -> (i32, String) {
    let out = Command::new(resil_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A cgroup that does not exist: should a test reach the attach step by mistake, it fails
/// instead of attaching to the machine's root cgroup.
const NO_CGROUP: &str = "/nonexistent/resil-test-cgroup";

#[test]
fn bad_usage_and_missing_daemon_are_clear() {
    let (code, err) = resil(&[
        "daemon",
        "--iface",
        "resil-nope0",
        "--socket",
        "/tmp/resil-nope.sock",
        "--cgroup",
        NO_CGROUP,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("interface resil-nope0 not found"), "{err}");

    let dir = std::env::temp_dir().join(format!("resil-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[defaults]\nconnect_timeout = \"fast\"\n").unwrap();
    let (code, err) = resil(&[
        "daemon",
        "--iface",
        "lo",
        "--config",
        &config.to_string_lossy(),
        "--cgroup",
        NO_CGROUP,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("connect_timeout"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let (code, err) = resil(&["status", "--socket", "/tmp/resil-no-such.sock"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("daemon is not running"), "{err}");

    let (code, err) = resil(&["status", "-o", "yaml"]);
    assert_eq!(code, 2, "{err}");

    let (code, err) = resil(&["daemon", "--iface", "lo", "--cgroup", NO_CGROUP]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a cgroup v2 directory"), "{err}");
}

#[test]
fn non_root_users_get_one_clear_sentence() {
    let lab = Lab::new("nr").unwrap();
    let daemon = lab.daemon().unwrap();
    let nobody = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(resil_bin())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let socket = daemon.socket.to_string_lossy().into_owned();
    let (code, err) = nobody(&["status", "--socket", &socket]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("permission denied"), "{err}");
    let (code, err) = nobody(&[
        "daemon",
        "--iface",
        "lo",
        "--socket",
        "/tmp/resil-nobody.sock",
        "--cgroup",
        NO_CGROUP,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("lacks CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"),
        "{err}"
    );
}

#[test]
fn refuses_interfaces_without_ethernet_frames() {
    let lab = Lab::new("tn").unwrap();
    // With loopback down the link type can still be read: the veth is accepted.
    sh("ip", &["-n", &lab.client_ns, "link", "set", "lo", "down"]).unwrap();
    lab.daemon().unwrap();
    sh(
        "ip",
        &[
            "-n",
            &lab.client_ns,
            "tuntap",
            "add",
            "dev",
            "rtun0",
            "mode",
            "tun",
        ],
    )
    .unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.client_ns))
        .arg(resil_bin())
        .args(["daemon", "--iface", "rtun0", "--socket"])
        .arg(lab.dir.join("tun.sock"))
        .arg("--cgroup")
        .arg(&lab.cgroup)
        .arg("--pin-dir")
        .arg(lab.dir.join("never-used"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rtun0 does not carry Ethernet frames"),
        "{err}"
    );
}

/// Exactly CAP_NET_ADMIN (12), CAP_PERFMON (38) and CAP_BPF (39).
const DOCUMENTED_CAPS: u64 = (1 << 12) | (1 << 38) | (1 << 39);

/// `setpriv` leaving root exactly the documented capabilities; its own options (groups)
/// follow, then `--` and the daemon.
const ONLY_DOCUMENTED_CAPS: [&str; 3] = [
    "setpriv",
    "--bounding-set=-all,+bpf,+net_admin,+perfmon",
    "--inh-caps=-all",
];

fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    u64::from_str_radix(&hex, 16).unwrap()
}

/// Starts the daemon in `lab` through `wrapper`, which must leave it exactly the documented
/// capabilities, and checks that it does its whole job so: three refusals open a circuit, the
/// kernel then refuses at once, and a restart the same way adopts the open circuit.
fn does_its_work_with_only_the_documented_capabilities(lab: &Lab, wrapper: &[&str]) -> Daemon {
    let config = "[defaults]\nconsecutive_failures = 3\nopen_wait = \"1m\"\n";
    let mut daemon = lab.daemon_wrapped(wrapper, config, &[]).unwrap();
    let pid = daemon.pid().unwrap();
    assert_eq!(effective_caps(pid), DOCUMENTED_CAPS, "pid {pid}");
    let addr: std::net::SocketAddr = format!("{}:8080", lab.server_ip(resil_tests::Family::V4))
        .parse()
        .unwrap();
    let endpoint = addr.to_string();
    lab.connect_in_cgroup(addr, 3, Duration::from_secs(5), false);
    let e = daemon.wait_for(&endpoint, Duration::from_secs(10), |e| e.state == "open");
    assert_eq!(e.state, "open", "{e:?}\n{}", daemon.log_text());
    for a in lab.connect_in_cgroup(addr, 2, Duration::from_secs(5), false) {
        assert_eq!(a.outcome, "ConnectionRefused", "{a:?}");
    }
    let e = daemon.wait_for(&endpoint, Duration::from_secs(10), |e| e.fast_failed >= 2);
    assert_eq!(e.fast_failed, 2, "{e:?}");
    daemon.restart(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(effective_caps(daemon.pid().unwrap()), DOCUMENTED_CAPS);
    let e = daemon.wait_for(&endpoint, Duration::from_secs(10), |e| e.state == "open");
    assert_eq!(e.state, "open", "{e:?}\n{}", daemon.log_text());
    daemon
}

#[test]
fn the_daemon_does_its_work_with_only_the_documented_capabilities() {
    let lab = Lab::new("cp").unwrap();
    let limited = [&ONLY_DOCUMENTED_CAPS[..], &["--"]].concat();
    does_its_work_with_only_the_documented_capabilities(&lab, &limited);
}

/// The shared objects the image's runtime base, gcr.io/distroless/cc-debian12
/// (deploy/Dockerfile), ships: glibc's and libgcc_s (and libstdc++, libgomp).
const DISTROLESS_CC: [&str; 10] = [
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libgomp.so.1",
];

/// A root filesystem holding what the image's runtime stage adds to nothing: the binary at
/// /usr/local/bin/resil and the shared objects it loads, at the paths it loads them from. No
/// shell, no /etc, no /dev.
fn image_root(root: &Path) -> PathBuf {
    let binary = resil_bin();
    let needed = sh("readelf", &["-d", &binary.to_string_lossy()]).unwrap();
    for line in needed.lines().filter(|l| l.contains("(NEEDED)")) {
        let library = line
            .split('[')
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .unwrap_or_else(|| panic!("readelf line: {line}"));
        assert!(
            DISTROLESS_CC.contains(&library),
            "resil links {library}, which the image's distroless base lacks"
        );
    }
    let place = |from: &Path, inside: &str| {
        let to = root.join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    };
    place(&binary, "/usr/local/bin/resil");
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)";
    // the vDSO has no file.
    let loaded = sh("ldd", &[&binary.to_string_lossy()]).unwrap();
    for line in loaded.lines() {
        let path = line.split("=> ").nth(1).unwrap_or(line).trim();
        let path = path.split(" (").next().unwrap_or(path);
        if path.starts_with('/') {
            place(Path::new(path), path);
        }
    }
    root.to_path_buf()
}

#[test]
fn the_image_root_runs_the_daemon_as_the_daemonset_does() {
    let lab = Lab::new("im").unwrap();
    let root = image_root(&lab.dir.join("image"));
    // As the DaemonSet runs it: read-only root, the host's /sys (bpffs, cgroup root) and
    // /proc, the lab directory for the socket and the policy (its /run/resil and ConfigMap),
    // capabilities dropped to the three, no privilege escalation.
    let container = target_bin("resil-container");
    let (container, root_text, dir) = (
        container.to_string_lossy(),
        root.to_string_lossy(),
        lab.dir.to_string_lossy(),
    );
    let wrapper = [
        &*container,
        "--root",
        &*root_text,
        "--bind",
        "/sys",
        "--bind",
        "/proc",
        "--bind",
        &*dir,
        "--caps",
        "bpf,net_admin,perfmon",
        "--entrypoint",
        "/usr/local/bin/resil",
        "--",
    ];
    let daemon = does_its_work_with_only_the_documented_capabilities(&lab, &wrapper);
    let pid = daemon.pid().unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        root,
        "the daemon runs in the image root"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let shells = ["bin/sh", "bin/bash", "usr/bin/sh", "etc"];
    assert!(
        shells.iter().all(|p| !root.join(p).exists()),
        "the image root holds only the binary and its libraries"
    );
}

#[test]
fn each_missing_capability_is_named() {
    let lab = Lab::new("cm").unwrap();
    for (keep, missing) in [
        ("+net_admin,+perfmon", "CAP_BPF"),
        ("+bpf,+perfmon", "CAP_NET_ADMIN"),
        ("+bpf,+net_admin", "CAP_PERFMON"),
    ] {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.client_ns))
            .arg("setpriv")
            .arg(format!("--bounding-set=-all,{keep}"))
            .args(["--inh-caps=-all", "--"])
            .arg(resil_bin())
            .args(["daemon", "--iface", &lab.client_if, "--socket"])
            .arg(lab.dir.join("caps.sock"))
            .arg("--cgroup")
            .arg(&lab.cgroup)
            .arg("--pin-dir")
            .arg(lab.dir.join("never-used"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("lacks {missing}:")), "{err}");
    }
}

#[test]
fn a_socket_group_lets_its_members_use_the_cli_and_no_one_else() {
    let lab = Lab::new("sg").unwrap();
    // A group for the test alone: a free id, given numerically (no /etc/group entry needed).
    let gid = 47_000 + std::process::id() % 10_000;
    let gid_text = gid.to_string();
    let group_arg = ["--socket-group", gid_text.as_str()];
    // As systemd (SupplementaryGroups=) and the chart (supplementalGroups) run it: the
    // documented capabilities only, no CAP_CHOWN, and in the group.
    let in_group = format!("--groups={gid_text}");
    fn limited(groups: &str) -> Vec<&str> {
        [&ONLY_DOCUMENTED_CAPS[..], &[groups, "--"]].concat()
    }
    let daemon = lab
        .daemon_wrapped(&limited(&in_group), "", &group_arg)
        .unwrap();
    assert_eq!(effective_caps(daemon.pid().unwrap()), DOCUMENTED_CAPS);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    // The lab directory must let others reach the socket.
    std::fs::set_permissions(&lab.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_user = |groups: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534"])
            .arg(format!("--groups={groups}"))
            .arg("--")
            .arg(resil_bin())
            .args(["status", "--socket"])
            .arg(&daemon.socket)
            .output()
            .unwrap()
    };
    let member = as_user(&gid_text);
    assert!(
        member.status.success(),
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
    let outsider = as_user("65534");
    let err = String::from_utf8_lossy(&outsider.stderr);
    assert_eq!(outsider.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    drop(daemon);

    // Not in the group and without CAP_CHOWN: one sentence saying what it needs.
    let err = match lab.daemon_wrapped(&limited("--clear-groups"), "", &group_arg) {
        Ok(_) => panic!("the daemon gave the socket to a group it is not in without CAP_CHOWN"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("the daemon must be in that group or have CAP_CHOWN"),
        "{err}"
    );

    let out = Command::new(resil_bin())
        .args([
            "daemon",
            "--socket-group",
            "resil-no-such-group",
            "--iface",
            "lo",
        ])
        .args(["--cgroup", NO_CGROUP, "--socket"])
        .arg(lab.dir.join("g.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("group resil-no-such-group does not exist"),
        "{err}"
    );
}
