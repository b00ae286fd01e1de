//! Names from the Kubernetes API (`--kubernetes-names`): pod IPs name endpoints
//! `namespace/pod`, service cluster IPs `namespace/service`. A thread per kind lists (in pages),
//! then watches, and sends what changed to the agent; it relists when the watch ends or falls
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
/// Wait after the first failure of an outage; it doubles with each further failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between attempts while the API server fails.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The most objects asked for in one page of a list (the `limit` client-go uses too).
const LIST_PAGE: usize = 500;

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

/// The fields of a pod's spec (`hostNetwork`) and a service's (`clusterIP`, `clusterIPs`)
/// that names need; serde skips the rest.
#[derive(Debug, Deserialize, Default)]
struct Spec {
    #[serde(default, rename = "hostNetwork")]
    host_network: bool,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: String,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
}

/// The fields of a pod's status that names need (a service's has none of them).
#[derive(Debug, Deserialize, Default)]
struct PodStatus {
    #[serde(default)]
    phase: String,
    #[serde(default, rename = "podIP")]
    pod_ip: String,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIp>,
}

/// The fields of a pod or a service that names need.
#[derive(Debug, Deserialize, Default)]
struct Object {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Deserialize, Default)]
struct ListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
    /// Set when more pages follow: the next request passes it back.
    #[serde(default, rename = "continue")]
    next: String,
}

/// One page of a list.
#[derive(Debug, Deserialize)]
struct List {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Object>,
}

/// The Status object of a watch's ERROR event.
#[derive(Debug, Deserialize, Default)]
struct ApiStatus {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    message: String,
}

/// One line of a watch stream.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", content = "object", rename_all = "UPPERCASE")]
enum WatchEvent {
    Added(Object),
    Modified(Object),
    Deleted(Object),
    /// Only `metadata.resourceVersion`: how far the watch has got.
    Bookmark(Object),
    Error(ApiStatus),
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
            let status = &object.status;
            // A finished pod's IP goes back to the pool.
            if object.spec.host_network || matches!(status.phase.as_str(), "Succeeded" | "Failed") {
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
            let spec = &object.spec;
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
    /// Replaces everything with a list's objects, each as [`names_of`] gives it.
    fn reset(
        &mut self,
        kind: Kind,
        listed: impl IntoIterator<Item = (String, Vec<IpAddr>)>,
    ) -> Update {
        self.objects.clear();
        let mut set = Vec::new();
        for (name, ips) in listed {
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

    /// Applies one watch event; `None` if it changes no name. An address the object no longer
    /// has stays named if another object has it (a pod IP reused before the old pod's
    /// deletion arrived): it is named after that one again.
    fn apply(&mut self, kind: Kind, event: &WatchEvent) -> Option<Update> {
        let (object, deleted) = match event {
            WatchEvent::Added(object) | WatchEvent::Modified(object) => (object, false),
            WatchEvent::Deleted(object) => (object, true),
            WatchEvent::Bookmark(_) | WatchEvent::Error(_) => return None,
        };
        let (name, ips) = names_of(kind, object);
        let now = if deleted { Vec::new() } else { ips };
        let old = if now.is_empty() {
            self.objects.remove(&name)
        } else {
            self.objects.insert(name.clone(), now.clone())
        }
        .unwrap_or_default();
        let mut set: Vec<(IpAddr, String)> = now.iter().map(|ip| (*ip, name.clone())).collect();
        let mut removed = Vec::new();
        for ip in old.into_iter().filter(|ip| !now.contains(ip)) {
            match self.holder(&ip) {
                Some(other) => set.push((ip, other.clone())),
                None => removed.push(ip),
            }
        }
        (!set.is_empty() || !removed.is_empty()).then_some(Update {
            kind,
            reset: false,
            set,
            removed,
        })
    }

    /// A known object with `ip` (the first by name, so always the same one). A scan: it runs
    /// only for addresses an object gave up.
    fn holder(&self, ip: &IpAddr) -> Option<&String> {
        self.objects
            .iter()
            .filter(|(_, ips)| ips.contains(ip))
            .map(|(name, _)| name)
            .min()
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
    fn get(&self, query: &[(&str, &str)]) -> Result<ureq::Response> {
        let url = format!("{}{}", self.access.base, self.kind.path());
        let token = self.access.token()?;
        query
            .iter()
            .fold(self.agent.get(&url), |request, (key, value)| {
                request.query(key, value)
            })
            .set("Authorization", &format!("Bearer {token}"))
            .set("Accept", "application/json")
            .call()
            .map_err(|e| match e {
                ureq::Error::Status(410, _) => anyhow::Error::new(Gone),
                ureq::Error::Status(401 | 403, _) => anyhow!(
                    "the Kubernetes API refused to list {} (the service account needs list and watch on them)",
                    self.kind.name()
                ),
                other => anyhow!("{other}"),
            })
    }

    /// Lists every object, a page at a time (no `resourceVersion`: the watch cache would
    /// answer `resourceVersion=0` all at once, ignoring `limit`); keeps only names and
    /// addresses between pages. Returns the list's resource version.
    fn list(&mut self) -> Result<String> {
        let limit = LIST_PAGE.to_string();
        let mut next = String::new();
        let mut listed = Vec::new();
        loop {
            let mut query = vec![("limit", limit.as_str())];
            if !next.is_empty() {
                query.push(("continue", next.as_str()));
            }
            let response = self.get(&query)?;
            let page: List = serde_json::from_reader(BufReader::new(response.into_reader()))
                .with_context(|| {
                    format!("the list of {} is not what was expected", self.kind.name())
                })?;
            listed.extend(
                page.items
                    .iter()
                    .map(|item| names_of(self.kind, item))
                    .filter(|(_, ips)| !ips.is_empty()),
            );
            if page.metadata.next.is_empty() {
                let update = self.known.reset(self.kind, listed);
                self.send(update)?;
                return Ok(page.metadata.resource_version);
            }
            next = page.metadata.next;
        }
    }

    /// Follows changes from `version` until the server ends the watch.
    fn watch(&mut self, version: &str) -> Result<WatchEnd> {
        let timeout = WATCH_SECONDS.to_string();
        let query = [
            ("watch", "1"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", timeout.as_str()),
            ("resourceVersion", version),
        ];
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
            let event: WatchEvent = serde_json::from_str(&line).with_context(|| {
                format!(
                    "a watch event of {} is not what was expected",
                    self.kind.name()
                )
            })?;
            let object = match &event {
                // 410 (Gone, Expired) means the version is too old.
                WatchEvent::Error(status) if status.code == 410 => return Ok(WatchEnd::Expired),
                WatchEvent::Error(status) => bail!(
                    "the watch of {} failed: {} ({})",
                    self.kind.name(),
                    status.message,
                    status.code
                ),
                WatchEvent::Added(object)
                | WatchEvent::Modified(object)
                | WatchEvent::Deleted(object)
                | WatchEvent::Bookmark(object) => object,
            };
            if !object.metadata.resource_version.is_empty() {
                version.clone_from(&object.metadata.resource_version);
            }
            if let Some(update) = self.known.apply(self.kind, &event) {
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
        let mut outage = Outage::default();
        loop {
            let result = self.list().and_then(|mut version| {
                outage.ended(self.kind);
                loop {
                    match self.watch(&version)? {
                        WatchEnd::Closed(v) => version = v,
                        WatchEnd::Expired => return Ok(()),
                    }
                }
            });
            match result {
                Ok(()) => continue,
                Err(e) if self.updates.is_closed() => {
                    log::debug!("kubernetes {}: {e:#}", self.kind.name());
                    return;
                }
                Err(e) => std::thread::sleep(outage.failed(self.kind, &e)),
            }
        }
    }
}

/// Failures in a row of one watcher: one warning when they start, one info line when they
/// end, and a backoff that grows only while they last.
#[derive(Debug)]
struct Outage {
    failing: bool,
    backoff: Duration,
}

impl Default for Outage {
    fn default() -> Self {
        Outage {
            failing: false,
            backoff: FIRST_BACKOFF,
        }
    }
}

impl Outage {
    /// The server answered (a list worked): the next failure starts a new outage.
    fn ended(&mut self, kind: Kind) {
        if self.failing {
            info!("kubernetes names: {} available again", kind.name());
        }
        *self = Outage::default();
    }

    /// A failure; returns how long to wait before trying again.
    fn failed(&mut self, kind: Kind, error: &anyhow::Error) -> Duration {
        if !self.failing {
            warn!(
                "kubernetes names: {} not available: {error:#} (retrying)",
                kind.name()
            );
            self.failing = true;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        wait
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
            [names_of(
                Kind::Pod,
                &pod("shop", "web-0", "10.1.0.5", "Running", false),
            )],
        );
        assert!(reset.reset);
        assert_eq!(reset.set.len(), 2);
        // The pod comes back with another address: the old one is no longer its.
        let moved = known
            .apply(
                Kind::Pod,
                &WatchEvent::Modified(pod("shop", "web-0", "10.1.0.9", "Running", false)),
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
                &WatchEvent::Modified(pod("shop", "web-0", "10.1.0.9", "Failed", false)),
            )
            .unwrap();
        assert_eq!(done.removed, [ip("10.1.0.9"), ip("fd00::5")]);
        assert!(done.set.is_empty());
        let gone = known.apply(
            Kind::Pod,
            &WatchEvent::Deleted(pod("shop", "web-0", "10.1.0.9", "Failed", false)),
        );
        assert_eq!(gone, None, "nothing left to remove");
        assert_eq!(
            known.apply(Kind::Pod, &WatchEvent::Bookmark(Object::default())),
            None
        );
    }

    #[test]
    fn a_late_event_for_a_pod_whose_ip_was_reused_leaves_the_new_pods_name() {
        let mut names = crate::names::Names::new(Path::new("/nonexistent/hosts"));
        let mut known = Known::default();
        let mut feed = |event: WatchEvent| {
            let update = known.apply(Kind::Pod, &event);
            if let Some(update) = update.clone() {
                names.update_cluster(update);
            }
            (update, names.lookup(&ip("10.1.0.5"), 0).map(str::to_string))
        };
        let old = || pod("shop", "web-0", "10.1.0.5", "Running", false);
        let new = || pod("shop", "web-1", "10.1.0.5", "Running", false);
        feed(WatchEvent::Added(old()));
        let (_, name) = feed(WatchEvent::Added(new()));
        assert_eq!(name.as_deref(), Some("shop/web-1"));
        // The old pod's deletion arrives late: the address stays the new pod's.
        let (update, name) = feed(WatchEvent::Deleted(old()));
        assert_eq!(name.as_deref(), Some("shop/web-1"), "{update:?}");
        assert_eq!(update.map(|u| u.removed), Some(Vec::new()));
        // Likewise when a change, not a deletion, takes the address from the other holder.
        feed(WatchEvent::Added(old()));
        let (update, name) = feed(WatchEvent::Modified(pod(
            "shop", "web-0", "10.1.0.9", "Running", false,
        )));
        assert_eq!(name.as_deref(), Some("shop/web-1"), "{update:?}");
        // Once no pod has it, the address goes.
        let (update, name) = feed(WatchEvent::Deleted(new()));
        assert_eq!(name, None, "{update:?}");
        assert_eq!(update.map(|u| u.removed), Some(vec![ip("10.1.0.5")]));
    }

    #[test]
    fn list_pages_and_watch_lines_keep_only_what_names_need() {
        // A pod as the API server sends it, with far more than names need.
        let page: List = serde_json::from_value(serde_json::json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "812", "continue": "eyJ2IjoibWV0YSJ9", "remainingItemCount": 3},
            "items": [{
                "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1",
                             "labels": {"app": "web"}, "resourceVersion": "811"},
                "spec": {"hostNetwork": false, "nodeName": "n1",
                         "containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]},
                "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}],
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }],
        }))
        .unwrap();
        assert_eq!(page.metadata.resource_version, "812");
        assert_eq!(page.metadata.next, "eyJ2IjoibWV0YSJ9");
        assert_eq!(
            names_of(Kind::Pod, &page.items[0]),
            ("shop/web-0".to_string(), vec![ip("10.1.0.5")])
        );
        // A service's status has other fields than a pod's.
        let event: WatchEvent = serde_json::from_str(
            r#"{"type":"ADDED","object":{"metadata":{"name":"web","namespace":"shop"},"spec":{"clusterIP":"10.96.0.10","ports":[{"port":80}]},"status":{"loadBalancer":{}}}}"#,
        )
        .unwrap();
        let WatchEvent::Added(service) = event else {
            panic!("{event:?}")
        };
        assert_eq!(names_of(Kind::Service, &service).1, [ip("10.96.0.10")]);
        // An ERROR event's object is a Status, whose own `status` is a string.
        let event: WatchEvent = serde_json::from_str(
            r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 5 (812)","reason":"Expired","code":410}}"#,
        )
        .unwrap();
        let WatchEvent::Error(status) = event else {
            panic!("{event:?}")
        };
        assert_eq!(status.code, 410);
        let event: WatchEvent = serde_json::from_str(
            r#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"900","annotations":{"k8s.io/initial-events-end":"true"}}}}"#,
        )
        .unwrap();
        let WatchEvent::Bookmark(mark) = event else {
            panic!("{event:?}")
        };
        assert_eq!(mark.metadata.resource_version, "900");
    }
}
