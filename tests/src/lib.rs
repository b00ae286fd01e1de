//! The test lab: network namespaces joined by a veth pair, real TCP servers and clients in
//! them, and the real `resil` daemon attached on the client side.
//!
//! Every lab has unique names and removes everything it made when dropped, also when the
//! test fails (panics unwind through `Drop`).

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::sched::{setns, CloneFlags};
pub use resil_user::api::{EndpointStatus, StatusReport};

pub mod bench;
pub mod cleanup;
pub mod dns;

static LABS: AtomicUsize = AtomicUsize::new(0);

/// Address family of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Fails the test with a clear sentence unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged tests need root (BPF, network namespaces): run `cargo xtask test` as root"
    );
}

/// Runs `command`, failing with its stderr if it does not succeed.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread that has entered the network namespace `netns`.
pub fn in_netns<R: Send>(netns: &str, f: impl FnOnce() -> R + Send) -> R {
    let path = format!("/run/netns/{netns}");
    thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
            setns(ns, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Two network namespaces, `client` and `server`, joined by a veth pair with IPv4 and IPv6.
pub struct Lab {
    pub client_ns: String,
    pub server_ns: String,
    /// The client side's veth, where resil attaches.
    pub client_if: String,
    pub server_if: String,
    /// A private scratch directory (socket, config), removed on drop.
    pub dir: PathBuf,
    /// A child cgroup of the lab's own: the daemon enforces for it, clients run in it.
    pub cgroup: PathBuf,
}

/// One connection attempt made by [`Lab::connect_in_cgroup`].
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// `ok`, or the `std::io::ErrorKind` name (`ConnectionRefused`, `TimedOut`, …).
    pub outcome: String,
    pub elapsed: Duration,
}

/// A new lab's unique id, its scratch directory and its child cgroup, both created (and the
/// cgroup remembered for an interrupted run's clean-up).
fn lab_place(tag: &str) -> Result<(String, PathBuf, PathBuf)> {
    require_root();
    if cleanup::closed() {
        bail!("interrupted");
    }
    let n = LABS.fetch_add(1, Ordering::SeqCst);
    let id = format!("{}{}", std::process::id() % 100_000, n);
    let dir = std::env::temp_dir().join(format!("resil-lab-{tag}-{id}"));
    let cgroup = cgroup2_root().join(format!("resil-test-{tag}-{id}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&cgroup)?;
    cleanup::cgroup(&cgroup);
    Ok((id, dir, cgroup))
}

fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup v2 hierarchy")
}

impl Lab {
    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
    pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);

    /// Builds a fresh lab. `tag` (a few letters) makes names readable in `ip netns`.
    pub fn new(tag: &str) -> Result<Lab> {
        let (id, dir, cgroup) = lab_place(tag)?;
        let lab = Lab {
            client_ns: format!("resil-{tag}-{id}-c"),
            server_ns: format!("resil-{tag}-{id}-s"),
            client_if: format!("rc{id}"),
            server_if: format!("rs{id}"),
            dir,
            cgroup,
        };
        // From here on, Drop cleans up whatever part was made.
        cleanup::namespace(&lab.client_ns);
        cleanup::namespace(&lab.server_ns);
        sh("ip", &["netns", "add", &lab.client_ns])?;
        sh("ip", &["netns", "add", &lab.server_ns])?;
        sh(
            "ip",
            &[
                "link",
                "add",
                &lab.client_if,
                "netns",
                &lab.client_ns,
                "type",
                "veth",
                "peer",
                "name",
                &lab.server_if,
                "netns",
                &lab.server_ns,
            ],
        )?;
        for (ns, ifname, v4, v6) in [
            (
                &lab.client_ns,
                &lab.client_if,
                Self::CLIENT_V4,
                Self::CLIENT_V6,
            ),
            (
                &lab.server_ns,
                &lab.server_if,
                Self::SERVER_V4,
                Self::SERVER_V6,
            ),
        ] {
            sh(
                "ip",
                &["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", ifname],
            )?;
            sh(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    ifname,
                    "nodad",
                ],
            )?;
            sh("ip", &["-n", ns, "link", "set", ifname, "up"])?;
            sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// The server's address of a family.
    pub fn server_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(Self::SERVER_V4),
            Family::V6 => IpAddr::V6(Self::SERVER_V6),
        }
    }

    /// The status key of the server's `port`, as `resil status` prints it.
    pub fn server_endpoint(&self, family: Family, port: u16) -> String {
        SocketAddr::new(self.server_ip(family), port).to_string()
    }

    /// Runs `f` inside the client namespace.
    pub fn client<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        in_netns(&self.client_ns, f)
    }

    /// Removes every nftables rule from the server namespace.
    pub fn clear_server_rules(&self) -> Result<()> {
        sh(
            "ip",
            &["netns", "exec", &self.server_ns, "nft", "flush", "ruleset"],
        )?;
        Ok(())
    }

    /// Adds one nftables rule to the server namespace's input path, for example
    /// `tcp dport 7777 drop`.
    pub fn server_input_rule(&self, rule: &str) -> Result<()> {
        nft_rule(&self.server_ns, &self.dir, "input", rule)
    }

    /// Starts a TCP server on `port` (both families) in the server namespace.
    pub fn serve(&self, port: u16, mode: ServeMode) -> Result<Server> {
        Server::start(&self.server_ns, port, mode)
    }

    /// Starts a DNS resolver on UDP port 53 of the server namespace.
    pub fn serve_dns(&self, mode: dns::DnsMode) -> Result<dns::DnsServer> {
        dns::DnsServer::start(&self.server_ns, mode)
    }

    /// Starts the real `resil daemon` in the client namespace, attached to the client veth,
    /// and waits until it answers.
    pub fn daemon(&self) -> Result<Daemon> {
        self.daemon_with_config("")
    }

    /// Like [`Lab::daemon`] with the given configuration file text.
    pub fn daemon_with_config(&self, config: &str) -> Result<Daemon> {
        Daemon::start(
            &self.client_ns,
            &self.client_if,
            &self.cgroup,
            &self.dir,
            config,
        )
    }

    /// Like [`Lab::daemon_with_config`] with extra `resil daemon` arguments.
    pub fn daemon_with_args(&self, config: &str, extra: &[&str]) -> Result<Daemon> {
        self.daemon_wrapped(&[], config, extra)
    }

    /// Like [`Lab::daemon_with_args`], run through `wrapper` (for example `setpriv` with its
    /// options), which must exec the daemon.
    pub fn daemon_wrapped(&self, wrapper: &[&str], config: &str, extra: &[&str]) -> Result<Daemon> {
        Daemon::start_with(
            &self.client_ns,
            &self.client_if,
            &self.cgroup,
            &self.dir,
            config,
            wrapper,
            extra,
        )
    }

    /// The daemon on the server side instead, to watch the services clients connect to.
    pub fn server_daemon(&self) -> Result<Daemon> {
        self.server_daemon_with_config("")
    }

    /// Like [`Lab::server_daemon`] with the given configuration file text.
    pub fn server_daemon_with_config(&self, config: &str) -> Result<Daemon> {
        Daemon::start(
            &self.server_ns,
            &self.server_if,
            &self.cgroup,
            &self.dir,
            config,
        )
    }

    /// Makes `count` connections to `addr` from a process in the lab's cgroup and the client
    /// namespace (where resil enforces), each with `timeout`; all at once if `parallel`.
    pub fn connect_in_cgroup(
        &self,
        addr: SocketAddr,
        count: usize,
        timeout: Duration,
        parallel: bool,
    ) -> Vec<Attempt> {
        let mut cmd = Command::new(target_bin("resil-connect"));
        cmd.arg(&self.cgroup)
            .arg(&self.client_ns)
            .arg(addr.to_string())
            .arg(count.to_string())
            .arg(timeout.as_millis().to_string());
        if parallel {
            cmd.arg("parallel");
        }
        let out = cmd.output().expect("run resil-connect");
        assert!(
            out.status.success(),
            "resil-connect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                Attempt {
                    outcome: v["outcome"].as_str().unwrap_or("?").to_string(),
                    elapsed: Duration::from_micros(v["elapsed_us"].as_u64().unwrap_or(0)),
                }
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and with it the peer.
        let _ = sh("ip", &["netns", "del", &self.client_ns]);
        let _ = sh("ip", &["netns", "del", &self.server_ns]);
        let _ = std::fs::remove_dir_all(&self.dir);
        // Its processes (clients) have exited by now; an empty cgroup is removed with rmdir.
        let _ = std::fs::remove_dir(&self.cgroup);
        cleanup::forget(
            &[&self.client_ns, &self.server_ns],
            Some(&self.cgroup),
            None,
        );
    }
}

/// Three namespaces, client — router — server, with the router forwarding between two veth
/// pairs: traffic resil sees only as forwarded packets (no local socket), as for pods behind
/// a node.
pub struct RoutedLab {
    pub client_ns: String,
    pub router_ns: String,
    pub server_ns: String,
    /// The router's interface towards the server, where resil attaches.
    pub router_out: String,
    /// The client's interface, towards the router.
    pub client_if: String,
    pub dir: PathBuf,
    pub cgroup: PathBuf,
}

impl RoutedLab {
    /// Builds the three namespaces; addresses as in [`Lab`] for the server.
    pub fn new(tag: &str) -> Result<RoutedLab> {
        let (id, dir, cgroup) = lab_place(tag)?;
        let lab = RoutedLab {
            client_ns: format!("resil-{tag}-{id}-c"),
            router_ns: format!("resil-{tag}-{id}-r"),
            server_ns: format!("resil-{tag}-{id}-s"),
            router_out: format!("ro{id}"),
            client_if: format!("rc{id}"),
            dir,
            cgroup,
        };
        for ns in [&lab.client_ns, &lab.router_ns, &lab.server_ns] {
            cleanup::namespace(ns);
        }
        let (c, r, s) = (&lab.client_ns, &lab.router_ns, &lab.server_ns);
        for ns in [c, r, s] {
            sh("ip", &["netns", "add", ns])?;
            sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (client_if, router_in, server_if) =
            (lab.client_if.clone(), format!("ri{id}"), format!("rs{id}"));
        for (a, a_ns, b, b_ns) in [
            (&client_if, c, &router_in, r),
            (&lab.router_out, r, &server_if, s),
        ] {
            sh(
                "ip",
                &[
                    "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns",
                    b_ns,
                ],
            )?;
        }
        let plan = [
            (c, &client_if, "10.201.0.1/24", "fd00:201::1/64"),
            (r, &router_in, "10.201.0.254/24", "fd00:201::fe/64"),
            (r, &lab.router_out, "10.200.0.254/24", "fd00:200::fe/64"),
            (s, &server_if, "10.200.0.2/24", "fd00:200::2/64"),
        ];
        for (ns, ifname, v4, v6) in plan {
            sh("ip", &["-n", ns, "addr", "add", v4, "dev", ifname])?;
            sh("ip", &["-n", ns, "addr", "add", v6, "dev", ifname, "nodad"])?;
            sh("ip", &["-n", ns, "link", "set", ifname, "up"])?;
        }
        for (ns, v4, v6) in [
            (c, "10.201.0.254", "fd00:201::fe"),
            (s, "10.200.0.254", "fd00:200::fe"),
        ] {
            sh("ip", &["-n", ns, "route", "add", "default", "via", v4])?;
            sh(
                "ip",
                &["-n", ns, "-6", "route", "add", "default", "via", v6],
            )?;
        }
        sh(
            "ip",
            &["netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        )?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                r,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )?;
        Ok(lab)
    }

    /// Starts a TCP server on `port` in the server namespace.
    pub fn serve(&self, port: u16, mode: ServeMode) -> Result<Server> {
        Server::start(&self.server_ns, port, mode)
    }

    /// The daemon in the router namespace, on the interface towards the server.
    pub fn daemon(&self, config: &str) -> Result<Daemon> {
        Daemon::start(
            &self.router_ns,
            &self.router_out,
            &self.cgroup,
            &self.dir,
            config,
        )
    }

    /// The daemon in the client namespace instead, on the client's interface: it sees the
    /// server's packets one hop away.
    pub fn client_daemon(&self, config: &str) -> Result<Daemon> {
        Daemon::start(
            &self.client_ns,
            &self.client_if,
            &self.cgroup,
            &self.dir,
            config,
        )
    }

    /// Adds one nftables rule to the router's forward path, for example
    /// `tcp dport 8080 reject with tcp reset`.
    pub fn router_forward_rule(&self, rule: &str) -> Result<()> {
        nft_rule(&self.router_ns, &self.dir, "forward", rule)
    }

    /// Runs `f` inside the client namespace.
    pub fn client<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        in_netns(&self.client_ns, f)
    }
}

impl Drop for RoutedLab {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.router_ns, &self.server_ns] {
            let _ = sh("ip", &["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir(&self.cgroup);
        cleanup::forget(
            &[&self.client_ns, &self.router_ns, &self.server_ns],
            Some(&self.cgroup),
            None,
        );
    }
}

/// How a test server treats accepted connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeMode {
    /// Read until the client closes, then close.
    Echo,
    /// Reset every connection (SO_LINGER 0) once the client's first bytes arrive, before
    /// answering anything.
    ResetOnRequest,
    /// Read and discard until the client closes.
    Discard,
    /// Close each connection as soon as it is accepted (for connection-rate tests).
    Close,
}

/// A TCP server on a thread inside a namespace; stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    fn start(netns: &str, port: u16, mode: ServeMode) -> Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{netns}");
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let bound = (|| -> Result<Vec<TcpListener>> {
                setns(File::open(&path)?, CloneFlags::CLONE_NEWNET)?;
                let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                // A deep accept queue: connection-rate tests must not lose SYNs to it.
                nix::sys::socket::listen(&v4, nix::sys::socket::Backlog::new(LISTEN_BACKLOG)?)?;
                let v6 = bind_v6_only(port)?;
                for l in [&v4, &v6] {
                    l.set_nonblocking(true)?;
                }
                Ok(vec![v4, v6])
            })();
            let listeners = match bound {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !flag.load(Ordering::Relaxed) {
                let mut idle = true;
                for listener in &listeners {
                    if let Ok((stream, _)) = listener.accept() {
                        idle = false;
                        handle(stream, mode);
                    }
                }
                if idle {
                    thread::sleep(Duration::from_millis(2));
                }
            }
        });
        ready_rx
            .recv()
            .context("the server thread died")?
            .context("cannot start the test server")?;
        Ok(Server {
            stop,
            thread: Some(thread),
        })
    }
}

/// Accept-queue length of the lab's servers.
const LISTEN_BACKLOG: i32 = 1024;

fn bind_v6_only(port: u16) -> Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn6,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let addr = SockaddrIn6::from(std::net::SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        port,
        0,
        0,
    ));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    listen(&fd, Backlog::new(LISTEN_BACKLOG)?)?;
    Ok(TcpListener::from(fd))
}

/// Adds one nftables rule to the `hook` chain (input, forward …) of a namespace's test table.
fn nft_rule(netns: &str, dir: &Path, hook: &str, rule: &str) -> Result<()> {
    let script = format!(
        "table inet resil_test {{\n  chain {hook} {{ type filter hook {hook} priority 0; policy accept;\n    {rule}\n  }}\n}}\n"
    );
    let path = dir.join(format!("{netns}-{hook}.nft"));
    std::fs::write(&path, script)?;
    sh(
        "ip",
        &["netns", "exec", netns, "nft", "-f", &path.to_string_lossy()],
    )?;
    Ok(())
}

/// A plain HTTP/1.0 GET from the current namespace: status code, headers, body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of the HTTP headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, head.to_string(), body.to_string()))
}

/// Makes closing `stream` send a RST instead of a FIN.
pub fn reset_on_close(stream: &TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::Linger, &linger)
        .expect("SO_LINGER");
}

fn handle(stream: TcpStream, mode: ServeMode) {
    if mode == ServeMode::Close {
        return;
    }
    thread::spawn(move || {
        let mut stream = stream;
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            if mode == ServeMode::ResetOnRequest {
                reset_on_close(&stream);
                break;
            }
            if mode == ServeMode::Discard {
                continue;
            }
            if stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `resil` binary built by `cargo xtask build` (or `RESIL_BIN`).
pub fn resil_bin() -> PathBuf {
    match std::env::var_os("RESIL_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_bin("resil"),
    }
}

/// A binary of this workspace in the running one's profile directory:
/// target/<profile>/deps/<test> or target/<profile>/<bin> → target/<profile>/<name>.
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut profile_dir = exe.parent().expect("target dir");
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().expect("target dir");
    }
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// A running `resil daemon`; stopped with SIGTERM (then SIGKILL) when dropped, and its pinned
/// state removed with `resil daemon --cleanup`.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    /// Its bpffs directory (unique to this daemon).
    pub pin_dir: PathBuf,
    log: PathBuf,
    config: PathBuf,
    /// Its network namespace, as nsenter takes it (`--net=/run/netns/NAME`).
    netns: String,
    /// How it was started: `nsenter` and its arguments (a restart runs them again).
    command: Vec<std::ffi::OsString>,
    /// Where the extra arguments begin in `command`.
    extra_at: usize,
}

/// Where the labs' daemons pin their state: a directory of their own on the bpffs.
const LAB_PIN_ROOT: &str = "/sys/fs/bpf";

impl Daemon {
    fn start(netns: &str, iface: &str, cgroup: &Path, dir: &Path, config: &str) -> Result<Daemon> {
        Self::start_with(netns, iface, cgroup, dir, config, &[], &[])
    }

    /// Starts `wrapper… resil daemon … extra…` in `netns`.
    fn start_with(
        netns: &str,
        iface: &str,
        cgroup: &Path,
        dir: &Path,
        config: &str,
        wrapper: &[&str],
        extra: &[&str],
    ) -> Result<Daemon> {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let socket = dir.join(format!("resil-{n}.sock"));
        let config_path = dir.join(format!("resil-{n}.toml"));
        std::fs::write(&config_path, config)?;
        let log = dir.join(format!("daemon-{n}.log"));
        let lab = dir.file_name().map_or_else(
            || "lab".to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        let pin_dir = Path::new(LAB_PIN_ROOT).join(format!("{lab}-{n}"));
        cleanup::pin_dir(&pin_dir);
        let netns = format!("--net=/run/netns/{netns}");
        let mut command: Vec<std::ffi::OsString> = vec!["nsenter".into(), (&netns).into()];
        command.extend(wrapper.iter().map(Into::into));
        command.extend([
            resil_bin().into(),
            "daemon".into(),
            "--iface".into(),
            iface.into(),
            "--socket".into(),
            socket.clone().into(),
            "--config".into(),
            config_path.clone().into(),
            "--cgroup".into(),
            cgroup.into(),
            "--pin-dir".into(),
            pin_dir.clone().into(),
        ]);
        let extra_at = command.len();
        command.extend(extra.iter().map(Into::into));
        let mut daemon = Daemon {
            child: None,
            socket,
            pin_dir,
            log,
            config: config_path,
            netns,
            command,
            extra_at,
        };
        daemon.launch()?;
        Ok(daemon)
    }

    /// Starts the process (again) and waits until it answers.
    fn launch(&mut self) -> Result<()> {
        let log_file = File::options().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .env("RUST_LOG", "info,resil_user::circuits=debug")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("cannot start resil daemon")?;
        cleanup::process(child.id());
        if cleanup::closed() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            bail!("interrupted");
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.try_status().is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("resil daemon exited with {status}: {}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "resil daemon did not answer within 30 s: {}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a stopped daemon again with the same arguments and pin directory.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("still running");
        }
        self.launch()
    }

    /// Stops the daemon with SIGTERM and starts it again on the same pin directory with other
    /// extra arguments, as an upgrade that changes the daemon's flags would.
    pub fn restart_with_args(&mut self, extra: &[&str]) -> Result<()> {
        self.command.truncate(self.extra_at);
        self.command.extend(extra.iter().map(Into::into));
        self.restart(nix::sys::signal::Signal::SIGTERM)
    }

    /// Stops the daemon with `signal` (SIGTERM: an ordinary stop; SIGKILL: a crash) and starts
    /// it again with the same arguments and pin directory, as `systemctl restart` would.
    pub fn restart(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        let mut child = self.child.take().context("not running")?;
        cleanup::forget(&[], None, Some(child.id()));
        if signal == nix::sys::signal::Signal::SIGTERM {
            terminate(&mut child)?;
        } else {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
            child.wait()?;
        }
        self.launch()
    }

    /// The daemon's process id (nsenter execs it, so it is the child's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `resil ARGS --socket SOCK` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(resil_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .context("cannot run resil")
    }

    /// `resil events -o json`: one JSON object per line, oldest first.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let out = self
            .cli(&["events", "-o", "json"])
            .expect("run resil events");
        assert!(
            out.status.success(),
            "resil events: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }

    /// `resil report -o json`: the findings in force.
    pub fn findings(&self) -> Vec<serde_json::Value> {
        let out = self
            .cli(&["report", "-o", "json"])
            .expect("run resil report");
        assert!(
            out.status.success(),
            "resil report: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
        report["findings"].as_array().cloned().unwrap_or_default()
    }

    fn try_status(&self) -> Result<StatusReport> {
        let out = self.cli(&["status", "-o", "json"])?;
        if !out.status.success() {
            bail!(
                "resil status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `resil status -o json`, parsed.
    pub fn status(&self) -> StatusReport {
        self.try_status()
            .unwrap_or_else(|e| panic!("{e:#}\ndaemon log:\n{}", self.log_text()))
    }

    /// Polls status until `done` holds for `endpoint` (up to `within`), then returns the
    /// endpoint's figures either way, so the test's own assertions report what was seen.
    pub fn wait_for(
        &self,
        endpoint: &str,
        within: Duration,
        done: impl Fn(&EndpointStatus) -> bool,
    ) -> EndpointStatus {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .status()
                .endpoints
                .into_iter()
                .find(|e| e.endpoint == endpoint);
            match found {
                Some(e) if done(&e) || Instant::now() > deadline => return e,
                None if Instant::now() > deadline => panic!(
                    "{endpoint} never appeared in resil status\ndaemon log:\n{}",
                    self.log_text()
                ),
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .expect("signal the daemon");
    }

    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The configuration file the daemon reads (rewrite it, then send SIGHUP).
    pub fn config_path(&self) -> PathBuf {
        self.config.clone()
    }

    /// Sends SIGTERM and waits for the exit status; the pinned state stays (see
    /// [`Daemon::cleanup`]).
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        cleanup::forget(&[], None, Some(child.id()));
        terminate(&mut child)
    }

    /// `resil daemon --cleanup` on the daemon's pin directory, in its network namespace (as
    /// on a node, where both run in the host's: a classic TC filter is reachable only there).
    pub fn cleanup(&self) -> Result<std::process::Output> {
        Command::new("nsenter")
            .arg(&self.netns)
            .arg(resil_bin())
            .args(["daemon", "--cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .context("cannot run resil daemon --cleanup")
    }
}

/// Runs `resil daemon --cleanup --pin-dir DIR`.
pub fn cleanup_pins(dir: &Path) -> Result<std::process::Output> {
    Command::new(resil_bin())
        .args(["daemon", "--cleanup", "--pin-dir"])
        .arg(dir)
        .output()
        .context("cannot run resil daemon --cleanup")
}

fn terminate(child: &mut Child) -> Result<std::process::ExitStatus> {
    use nix::{sys::signal, unistd::Pid};
    let pid = Pid::from_raw(child.id() as i32);
    let _ = signal::kill(pid, signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("resil daemon ignored SIGTERM for 10 s (killed: {status})");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
        if !self.cleanup().is_ok_and(|out| out.status.success()) {
            // The namespace may be gone: what was attached there went with it.
            let _ = cleanup_pins(&self.pin_dir);
        }
        cleanup::forget_pin_dir(&self.pin_dir);
    }
}
