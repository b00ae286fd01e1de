//! Names from the Kubernetes API (`--kubernetes-names`): pod IPs name endpoints
//! `namespace/pod`, service cluster IPs `namespace/service`. A thread per kind lists, then
//! watches, and sends what changed to the agent; it relists when the watch ends or falls
//! behind, and backs off while the API server cannot be reached. Off unless asked for.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use log::{info, warn};
use serde::Deserialize;
use tokio::sync::mpsc;

/// Where a pod's service-account credentials are mounted.
pub const DEFAULT_CREDENTIALS: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// A watch asks the server to end after this long; the thread then watches again.
const WATCH_SECONDS: u64 = 300;
/// Longest wait between attempts while the API server fails.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The objects names come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    Service,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Pod => "/api/v1/pods",
            Kind::Service => "/api/v1/services",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Service => "services",
        }
    }
}

/// What changed for one kind: after `reset`, every name of that kind is in `set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub kind: Kind,
    pub reset: bool,
    pub set: Vec<(IpAddr, String)>,
    pub removed: Vec<IpAddr>,
}

/// How to reach the API server.
#[derive(Debug, Clone)]
pub struct ApiAccess {
    /// `https://host:port`.
    pub base: String,
    /// The directory with `token` and `ca.crt` (and the `namespace` file, unused).
    pub credentials: PathBuf,
}

impl ApiAccess {
    /// The API server from `--kubernetes-api`, else the in-cluster environment
    /// (`KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`).
    pub fn resolve(api: Option<&str>, credentials: &Path) -> Result<ApiAccess> {
        let base = match api {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    anyhow!("--kubernetes-names outside a cluster needs --kubernetes-api (KUBERNETES_SERVICE_HOST is not set)")
                })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                match host.parse::<IpAddr>() {
                    Ok(IpAddr::V6(v6)) => format!("https://[{v6}]:{port}"),
                    _ => format!("https://{host}:{port}"),
                }
            }
        };
        if !base.starts_with("https://") {
            bail!("the Kubernetes API address must start with https:// (not {base})");
        }
        for file in ["token", "ca.crt"] {
            let path = credentials.join(file);
            if !path.is_file() {
                bail!(
                    "{} not found: --kubernetes-names needs a service account's credentials (--kubernetes-credentials)",
                    path.display()
                );
            }
        }
        Ok(ApiAccess {
            base,
            credentials: credentials.to_path_buf(),
        })
    }

    fn agent(&self) -> Result<ureq::Agent> {
        let ca_path = self.credentials.join("ca.crt");
        let pem = std::fs::read(&ca_path)
            .with_context(|| format!("cannot read {}", ca_path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.with_context(|| format!("{} is not PEM", ca_path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("a certificate in {} is invalid", ca_path.display()))?;
        }
        if roots.is_empty() {
            bail!("{} holds no certificate", ca_path.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("no TLS protocol version available")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .timeout_connect(Duration::from_secs(10))
            // A watch is quiet for long stretches: bookmarks come about once a minute.
            .timeout_read(Duration::from_secs(WATCH_SECONDS + 60))
            .build())
    }

    /// The token, read for every request: kubelet rotates it.
    fn token(&self) -> Result<String> {
        let path = self.credentials.join("token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_string())
    }
}

#[derive(Debug, Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
}

#[derive(Debug, Deserialize, Default)]
struct PodIp {
    #[serde(default)]
    ip: String,
}

#[derive(Debug, Deserialize, Default)]
struct PodSpec {
    #[serde(default, rename = "hostNetwork")]
    host_network: bool,
}

#[derive(Debug, Deserialize, Default)]
struct PodStatus {
    #[serde(default)]
    phase: String,
    #[serde(default, rename = "podIP")]
    pod_ip: String,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIp>,
}

#[derive(Debug, Deserialize, Default)]
struct ServiceSpec {
    #[serde(default, rename = "clusterIP")]
    cluster_ip: String,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
}

/// The fields of a pod or a service that names need.
#[derive(Debug, Deserialize, Default)]
struct Object {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default)]
    status: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct List {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    items: Vec<Object>,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

fn parse_ips<'a>(texts: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = texts.filter_map(|t| t.parse().ok()).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The object's name (`namespace/name`) and the addresses it names: a running pod's own IPs
/// (not host-network pods: theirs is the node's), a service's cluster IPs.
fn names_of(kind: Kind, object: &Object) -> (String, Vec<IpAddr>) {
    let name = format!("{}/{}", object.metadata.namespace, object.metadata.name);
    let ips = match kind {
        Kind::Pod => {
            let spec: PodSpec = serde_json::from_value(object.spec.clone()).unwrap_or_default();
            let status: PodStatus =
                serde_json::from_value(object.status.clone()).unwrap_or_default();
            // A finished pod's IP goes back to the pool.
            if spec.host_network || matches!(status.phase.as_str(), "Succeeded" | "Failed") {
                Vec::new()
            } else {
                parse_ips(
                    status
                        .pod_ips
                        .iter()
                        .map(|p| p.ip.as_str())
                        .chain(std::iter::once(status.pod_ip.as_str())),
                )
            }
        }
        Kind::Service => {
            let spec: ServiceSpec = serde_json::from_value(object.spec.clone()).unwrap_or_default();
            parse_ips(
                spec.cluster_ips
                    .iter()
                    .map(String::as_str)
                    .chain(std::iter::once(spec.cluster_ip.as_str())),
            )
        }
    };
    (name, ips)
}

/// One kind's objects as last seen: name → addresses.
#[derive(Debug, Default)]
struct Known {
    objects: HashMap<String, Vec<IpAddr>>,
}

impl Known {
    /// Replaces everything with a list's items.
    fn reset(&mut self, kind: Kind, items: &[Object]) -> Update {
        self.objects.clear();
        let mut set = Vec::new();
        for item in items {
            let (name, ips) = names_of(kind, item);
            set.extend(ips.iter().map(|ip| (*ip, name.clone())));
            if !ips.is_empty() {
                self.objects.insert(name, ips);
            }
        }
        Update {
            kind,
            reset: true,
            set,
            removed: Vec::new(),
        }
    }

    /// Applies one watch event; `None` if it changes no name.
    fn apply(&mut self, kind: Kind, event: &str, object: &Object) -> Option<Update> {
        let (name, ips) = names_of(kind, object);
        let old = match event {
            "DELETED" => self.objects.remove(&name).unwrap_or_default(),
            "ADDED" | "MODIFIED" if ips.is_empty() => {
                self.objects.remove(&name).unwrap_or_default()
            }
            "ADDED" | "MODIFIED" => self
                .objects
                .insert(name.clone(), ips.clone())
                .unwrap_or_default(),
            _ => return None,
        };
        let now = if event == "DELETED" { Vec::new() } else { ips };
        let removed: Vec<IpAddr> = old.into_iter().filter(|ip| !now.contains(ip)).collect();
        let set: Vec<(IpAddr, String)> = now.into_iter().map(|ip| (ip, name.clone())).collect();
        (!set.is_empty() || !removed.is_empty()).then_some(Update {
            kind,
            reset: false,
            set,
            removed,
        })
    }
}

/// The API server no longer has the version asked for (HTTP 410).
#[derive(Debug)]
struct Gone;

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the resource version is too old (410 Gone)")
    }
}

impl std::error::Error for Gone {}

/// How one watch ended.
enum WatchEnd {
    /// The server closed it (its timeout): watch again from `resource_version`.
    Closed(String),
    /// The version is too old (410 Gone): list again.
    Expired,
}

struct Watcher {
    kind: Kind,
    access: ApiAccess,
    agent: ureq::Agent,
    known: Known,
    updates: mpsc::Sender<Update>,
}

impl Watcher {
    fn get(&self, query: &str) -> Result<ureq::Response> {
        let url = format!("{}{}?{query}", self.access.base, self.kind.path());
        let token = self.access.token()?;
        self.agent
            .get(&url)
            .set("Authorization", &format!("Bearer {token}"))
            .set("Accept", "application/json")
            .call()
            .map_err(|e| match e {
                ureq::Error::Status(410, _) => anyhow::Error::new(Gone),
                ureq::Error::Status(401 | 403, _) => anyhow!(
                    "the Kubernetes API refused to list {} (the service account needs get, list and watch on them)",
                    self.kind.name()
                ),
                other => anyhow!("{other}"),
            })
    }

    /// Lists every object; returns the list's resource version.
    fn list(&mut self) -> Result<String> {
        let response = self.get("resourceVersion=0")?;
        let list: List = serde_json::from_reader(response.into_reader()).with_context(|| {
            format!("the list of {} is not what was expected", self.kind.name())
        })?;
        let update = self.known.reset(self.kind, &list.items);
        self.send(update)?;
        Ok(list.metadata.resource_version)
    }

    /// Follows changes from `version` until the server ends the watch.
    fn watch(&mut self, version: &str) -> Result<WatchEnd> {
        let query = format!(
            "watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={version}"
        );
        let response = match self.get(&query) {
            Err(e) if e.is::<Gone>() => return Ok(WatchEnd::Expired),
            other => other?,
        };
        let mut version = version.to_string();
        for line in BufReader::new(response.into_reader()).lines() {
            let line = line.with_context(|| format!("the watch of {} broke", self.kind.name()))?;
            if line.trim().is_empty() {
                continue;
            }
            let event: WatchEvent = serde_json::from_str(&line)
                .with_context(|| format!("a watch event of {} is not JSON", self.kind.name()))?;
            if event.kind == "ERROR" {
                // A Status object; 410 (Gone, Expired) means the version is too old.
                if event.object.get("code").and_then(|c| c.as_u64()) == Some(410) {
                    return Ok(WatchEnd::Expired);
                }
                bail!("the watch of {} failed: {}", self.kind.name(), event.object);
            }
            let object: Object = serde_json::from_value(event.object).unwrap_or_default();
            if !object.metadata.resource_version.is_empty() {
                version = object.metadata.resource_version.clone();
            }
            if let Some(update) = self.known.apply(self.kind, &event.kind, &object) {
                self.send(update)?;
            }
        }
        Ok(WatchEnd::Closed(version))
    }

    fn send(&self, update: Update) -> Result<()> {
        self.updates
            .blocking_send(update)
            .map_err(|_| anyhow!("the daemon stopped listening"))
    }

    /// Lists, watches, relists, forever; backs off while the server fails.
    fn run(mut self) {
        let mut backoff = Duration::from_secs(1);
        let mut failing = false;
        loop {
            let result = self.list().and_then(|mut version| loop {
                match self.watch(&version)? {
                    WatchEnd::Closed(v) => version = v,
                    WatchEnd::Expired => return Ok(()),
                }
            });
            match result {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    continue;
                }
                Err(e) if self.updates.is_closed() => {
                    log::debug!("kubernetes {}: {e:#}", self.kind.name());
                    return;
                }
                Err(e) => {
                    if !failing {
                        warn!(
                            "kubernetes names: {} not available: {e:#} (retrying)",
                            self.kind.name()
                        );
                        failing = true;
                    }
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Starts one watcher thread per kind; their updates arrive on the returned channel.
pub fn start(access: &ApiAccess) -> Result<mpsc::Receiver<Update>> {
    let (tx, rx) = mpsc::channel(256);
    let agent = access.agent()?;
    for kind in [Kind::Pod, Kind::Service] {
        let watcher = Watcher {
            kind,
            access: access.clone(),
            agent: agent.clone(),
            known: Known::default(),
            updates: tx.clone(),
        };
        std::thread::Builder::new()
            .name(format!("kube-{}", kind.name()))
            .spawn(move || watcher.run())
            .context("cannot start the Kubernetes watcher")?;
    }
    info!(
        "naming endpoints from the Kubernetes API at {}",
        access.base
    );
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod with an IPv4 address and, when it has one, an IPv6 address too (dual stack).
    fn pod(ns: &str, name: &str, ip: &str, phase: &str, host: bool) -> Object {
        let ips: Vec<serde_json::Value> = if ip.is_empty() {
            Vec::new()
        } else {
            vec![
                serde_json::json!({"ip": ip}),
                serde_json::json!({"ip": "fd00::5"}),
            ]
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"},
            "spec": {"hostNetwork": host},
            "status": {"phase": phase, "podIP": ip, "podIPs": ips},
        }))
        .unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn running_pods_name_their_addresses_host_network_and_finished_ones_do_not() {
        let (name, ips) = names_of(
            Kind::Pod,
            &pod("shop", "web-0", "10.1.0.5", "Running", false),
        );
        assert_eq!(name, "shop/web-0");
        assert_eq!(ips, [ip("10.1.0.5"), ip("fd00::5")]);
        assert!(names_of(
            Kind::Pod,
            &pod("kube-system", "proxy", "10.0.0.1", "Running", true)
        )
        .1
        .is_empty());
        assert!(names_of(
            Kind::Pod,
            &pod("shop", "job", "10.1.0.6", "Succeeded", false)
        )
        .1
        .is_empty());
        // Not scheduled yet: no address.
        assert!(
            names_of(Kind::Pod, &pod("shop", "new", "", "Pending", false))
                .1
                .is_empty()
        );
    }

    #[test]
    fn services_name_their_cluster_ips_and_headless_ones_nothing() {
        let svc: Object = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::a"]},
        }))
        .unwrap();
        assert_eq!(
            names_of(Kind::Service, &svc),
            (
                "shop/web".to_string(),
                vec![ip("10.96.0.10"), ip("fd00:96::a")]
            )
        );
        let headless: Object = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None"},
        }))
        .unwrap();
        assert!(names_of(Kind::Service, &headless).1.is_empty());
    }

    #[test]
    fn watch_events_move_names_and_forget_deleted_objects() {
        let mut known = Known::default();
        let reset = known.reset(
            Kind::Pod,
            &[pod("shop", "web-0", "10.1.0.5", "Running", false)],
        );
        assert!(reset.reset);
        assert_eq!(reset.set.len(), 2);
        // The pod comes back with another address: the old one is no longer its.
        let moved = known
            .apply(
                Kind::Pod,
                "MODIFIED",
                &pod("shop", "web-0", "10.1.0.9", "Running", false),
            )
            .unwrap();
        assert_eq!(moved.removed, [ip("10.1.0.5")]);
        assert!(moved
            .set
            .contains(&(ip("10.1.0.9"), "shop/web-0".to_string())));
        // It finishes: both addresses go.
        let done = known
            .apply(
                Kind::Pod,
                "MODIFIED",
                &pod("shop", "web-0", "10.1.0.9", "Failed", false),
            )
            .unwrap();
        assert_eq!(done.removed, [ip("10.1.0.9"), ip("fd00::5")]);
        assert!(done.set.is_empty());
        let gone = known.apply(
            Kind::Pod,
            "DELETED",
            &pod("shop", "web-0", "10.1.0.9", "Failed", false),
        );
        assert_eq!(gone, None, "nothing left to remove");
        assert_eq!(known.apply(Kind::Pod, "BOOKMARK", &Object::default()), None);
    }
}
