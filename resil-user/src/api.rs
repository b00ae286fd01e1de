//! The local API: newline-delimited JSON over a unix socket, for its owner only (0600) or
//! also for one group (`--socket-group`, 0660).
//!
//! One request line, one response line. The daemon side hands each request to the agent loop
//! and writes back its answer; the client side is a blocking call used by the CLI.

use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::sys::stat::{umask, Mode};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// The default socket path.
pub const DEFAULT_SOCKET: &str = "/run/resil/resil.sock";
/// Longest request line the daemon reads.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// Every endpoint's figures.
    Status,
    /// Breaker transitions and findings, oldest first: those numbered after `after`, or all
    /// that are kept.
    Events {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// The findings in force.
    Report,
    /// An operator's command for an endpoint (`10.0.3.7:5432`) or a named dependency.
    Manual {
        action: crate::circuits::ManualAction,
        target: String,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(StatusReport),
    /// Answer to [`Request::Events`].
    Events(EventsReport),
    /// Answer to [`Request::Manual`].
    Manual(ManualReport),
    /// Answer to [`Request::Report`].
    Report(FindingsReport),
    /// The request could not be served.
    Error(String),
}

/// `resil status -o json`: one object with every endpoint (and every resolver).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub endpoints: Vec<EndpointStatus>,
    /// DNS resolvers this node queries.
    #[serde(default)]
    pub resolvers: Vec<ResolverStatus>,
}

/// One DNS resolver in [`StatusReport`]: counts since the daemon first saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolverStatus {
    /// `10.0.0.53:53`.
    pub resolver: String,
    #[serde(flatten)]
    pub counts: crate::resolvers::DnsCounts,
    /// Answer latency percentiles, null before the first answer.
    pub latency_us: Option<Latency>,
}

/// `resil report -o json`: the findings in force, by domain, worst first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindingsReport {
    pub findings: Vec<crate::findings::Finding>,
}

/// Whose endpoint it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// A remote endpoint this node connects to.
    Outbound,
    /// A local service remote clients connect to.
    Inbound,
}

/// One endpoint in [`StatusReport`]; the field names are a stable interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// `10.0.0.2:80` or `[fd00::2]:80`.
    pub endpoint: String,
    /// Outbound (a dependency) or inbound (a local service).
    pub direction: Side,
    /// Breaker state: closed, open, half_open, forced_open, disabled, metrics_only.
    pub state: String,
    pub attempts: u64,
    pub established: u64,
    pub refused: u64,
    pub timeouts: u64,
    pub unreachable: u64,
    pub resets_in: u64,
    pub resets_out: u64,
    pub syn_retransmits: u64,
    pub retransmits: u64,
    /// Data segments on established connections, either direction.
    #[serde(default)]
    pub segments: u64,
    /// Established connections that ended.
    #[serde(default)]
    pub closed: u64,
    /// Resets received (in `resets_in` too) sent by something on the path, not the peer.
    #[serde(default)]
    pub path_resets: u64,
    pub fast_failed: u64,
    /// Connections a metrics-only policy would have refused.
    pub would_fast_fail: u64,
    /// 0..1, or null while there are not enough outcomes.
    pub failure_rate: Option<f64>,
    /// Handshake latency percentiles, null before the first handshake.
    pub connect_latency_us: Option<Latency>,
    /// Why the breaker is in its state (null while it never left closed).
    pub reason: Option<String>,
    /// The named dependency whose policy applies (null: the defaults).
    pub dependency: Option<String>,
    /// The endpoint's name: the dependency's, else from a recent DNS answer or /etc/hosts.
    #[serde(default)]
    pub name: Option<String>,
    /// A local service whose new connections resil refuses at XDP (see `reason`).
    #[serde(default)]
    pub shedding: bool,
}

/// What a manual command did: each endpoint and its state afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManualReport {
    pub endpoints: Vec<ManualResult>,
}

/// One endpoint in a [`ManualReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManualResult {
    pub endpoint: String,
    pub dependency: Option<String>,
    pub state: String,
}

/// A breaker transition, as `resil events` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionEvent {
    pub endpoint: String,
    pub dependency: Option<String>,
    pub from: String,
    pub to: String,
    /// The rule and its figures, in words.
    pub reason: String,
    /// The same, as data.
    pub details: crate::breaker::Reason,
}

/// Answer to [`Request::Events`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsReport {
    pub events: Vec<crate::events::Sequenced>,
    /// Events after the one asked for that are no longer kept (the reader fell behind).
    pub lost: u64,
    /// When the answering daemon started (Unix seconds): event numbers start again at 1 when
    /// it changes.
    #[serde(default)]
    pub boot: f64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

/// A request waiting for the agent loop's answer.
pub type Pending = (Request, oneshot::Sender<Response>);

/// The daemon's listening socket; removes the socket file when dropped.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Creates the socket (and its directory), mode 0600. Refuses to take over the socket of a
    /// daemon that is still answering; replaces a stale one.
    pub fn bind(path: &Path, group: Option<&SocketGroup>) -> Result<Server> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; choose another --socket path",
                    path.display()
                );
            }
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "another resil daemon is already running on {}",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        // Create the socket 0600 from the start: no window where others could connect.
        let old_umask = umask(Mode::from_bits_truncate(0o177));
        let listener = UnixListener::bind(path);
        umask(old_umask);
        let listener = listener.with_context(|| format!("cannot listen on {}", path.display()))?;
        let server = Server {
            listener,
            path: path.to_path_buf(),
        };
        match group {
            None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict {} to its owner", path.display()))?,
            Some(group) => {
                nix::unistd::chown(path, None, Some(group.gid)).with_context(|| {
                    format!(
                        "cannot give {} to group {} (the daemon must be in that group or have CAP_CHOWN)",
                        path.display(),
                        group.name
                    )
                })?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .with_context(|| {
                        format!("cannot open {} to group {}", path.display(), group.name)
                    })?;
            }
        }
        Ok(server)
    }
}

/// The group whose members may use the API socket (`--socket-group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    /// As given.
    pub name: String,
    pub gid: nix::unistd::Gid,
}

impl SocketGroup {
    /// Looks a group up by name (or takes a numeric id).
    pub fn lookup(name: &str) -> Result<SocketGroup> {
        let gid = match name.parse::<u32>() {
            Ok(id) => nix::unistd::Gid::from_raw(id),
            Err(_) => {
                nix::unistd::Group::from_name(name)
                    .with_context(|| format!("cannot look up group {name}"))?
                    .with_context(|| format!("group {name} does not exist (--socket-group)"))?
                    .gid
            }
        };
        Ok(SocketGroup {
            name: name.to_string(),
            gid,
        })
    }
}

impl Server {
    /// Accepts clients until the task is dropped, forwarding each request to `requests`.
    pub async fn serve(&self, requests: mpsc::Sender<Pending>) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    tokio::task::spawn_local(answer(stream, requests.clone()));
                }
                Err(e) => {
                    log::warn!("api: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: tokio::net::UnixStream, requests: mpsc::Sender<Pending>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let response = match read {
        Err(_) => Response::Error("no request within 5 s".into()),
        Ok(Err(e)) => Response::Error(format!("cannot read the request: {e}")),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Response::Error(format!("invalid request: {e}")),
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if requests.send((request, tx)).await.is_err() {
                    Response::Error("the daemon is shutting down".into())
                } else {
                    rx.await
                        .unwrap_or_else(|_| Response::Error("the daemon is shutting down".into()))
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

/// Sends one request to the daemon at `socket` and returns its response.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::NotFound => anyhow!(
            "the resil daemon is not running (no socket at {}); start it with `resil daemon`",
            socket.display()
        ),
        ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: the resil socket is for root and the daemon's --socket-group; try again with sudo or as a member of that group",
            socket.display()
        ),
        ErrorKind::ConnectionRefused => anyhow!(
            "the resil daemon is not running ({} is left from an earlier run)",
            socket.display()
        ),
        _ => anyhow!(
            "cannot connect to the resil daemon at {}: {e}",
            socket.display()
        ),
    })?;
    let timeout = Some(Duration::from_secs(10));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .with_context(|| format!("cannot send the request to {}", socket.display()))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .with_context(|| format!("no answer from the resil daemon at {}", socket.display()))?;
    serde_json::from_str(&reply).with_context(|| {
        format!(
            "the resil daemon at {} sent an answer this client does not understand",
            socket.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"events"}"#).unwrap(),
            Request::Events { after: None }
        );
        let r = Response::Error("x".into());
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"error":"x"}"#);
    }

    #[test]
    fn client_errors_are_clear() {
        let e = call(Path::new("/nonexistent/resil.sock"), &Request::Status).unwrap_err();
        assert!(e.to_string().contains("not running"), "{e}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_requests_over_the_socket() {
        let dir = std::env::temp_dir().join(format!("resil-api-test-{}", std::process::id()));
        let path = dir.join("sub/resil.sock");
        let server = Server::bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            Server::bind(&path, None).is_err(),
            "a live socket is not taken over"
        );
        let (tx, mut rx) = mpsc::channel::<Pending>(4);
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                tokio::task::spawn_local(async move { server.serve(tx).await });
                tokio::task::spawn_local(async move {
                    while let Some((_, reply)) = rx.recv().await {
                        let _ = reply.send(Response::Status(StatusReport {
                            endpoints: vec![],
                            resolvers: vec![],
                        }));
                    }
                });
                let p = path.clone();
                let response = tokio::task::spawn_blocking(move || call(&p, &Request::Status))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    response,
                    Response::Status(StatusReport {
                        endpoints: vec![],
                        resolvers: vec![]
                    })
                );
            })
            .await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
