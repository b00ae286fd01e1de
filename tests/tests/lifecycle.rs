//! The daemon's life: it attaches, detaches everything on SIGTERM (twice in a row), and
//! refuses bad input with clear sentences and the documented exit codes.

use std::process::Command;

use aya::programs::{SchedClassifier, TcAttachType};
use resil_tests::{in_netns, resil_bin, sh, Lab};

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

#[test]
fn start_and_stop_twice_leaves_nothing_behind() {
    let lab = Lab::new("lc").unwrap();
    let before = attachments(&lab);
    assert!(!before.contains("resil"), "{before}");
    for round in 1..=2 {
        let daemon = lab.daemon().unwrap();
        let during = attachments(&lab);
        assert!(
            during.contains("resil_xdp_ingr") && during.contains("Egress: resil_tc_egress"),
            "round {round}: programs not attached:\n{during}"
        );
        let socket = daemon.socket.clone();
        let status = daemon.stop().unwrap();
        assert!(
            status.success(),
            "round {round}: daemon exited with {status}"
        );
        let after = attachments(&lab);
        assert!(
            !after.contains("resil"),
            "round {round}: left attached:\n{after}"
        );
        assert!(
            !after.contains("clsact"),
            "round {round}: left a qdisc:\n{after}"
        );
        assert!(!socket.exists(), "round {round}: socket left behind");
    }
    assert!(!std::path::Path::new("/sys/fs/bpf/resil").exists());
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
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn refuses_interfaces_without_ethernet_frames() {
    let lab = Lab::new("tn").unwrap();
    // With loopback down the link type can still be read: the veth is accepted.
    sh("ip", &["-n", &lab.client_ns, "link", "set", "lo", "down"]).unwrap();
    lab.daemon().unwrap().stop().unwrap();
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
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rtun0 does not carry Ethernet frames"),
        "{err}"
    );
}
