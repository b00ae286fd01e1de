//! Names for addresses, so people read `api.internal (10.0.3.7:443)` rather than a bare
//! address: in a cluster (`--kubernetes-names`) the pod or service that has the address
//! (`shop/web-0`), then the names recent DNS answers gave (what the application asked for),
//! then /etc/hosts. The policy's dependency names come first, from the circuits.
//!
//! Pure apart from reading the hosts file; times are CLOCK_MONOTONIC nanoseconds.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// How long a name learned from DNS is kept at least, whatever its TTL: applications keep
/// using an address long after a short TTL ran out.
const MIN_KEEP_NS: u64 = 600 * 1_000_000_000;
/// Addresses with a learned name, at most.
const CAPACITY: usize = 65_536;

/// A name from a DNS answer and until when it is kept.
#[derive(Debug, Clone)]
struct Learned {
    name: String,
    until_ns: u64,
}

/// The address book.
#[derive(Debug)]
pub struct Names {
    hosts_path: PathBuf,
    hosts_modified: Option<SystemTime>,
    hosts: HashMap<IpAddr, String>,
    learned: HashMap<IpAddr, Learned>,
    /// From the Kubernetes API: service cluster IPs, pod IPs.
    services: HashMap<IpAddr, String>,
    pods: HashMap<IpAddr, String>,
}

impl Names {
    /// A book reading hosts from `hosts_path` (normally /etc/hosts); a missing file is empty.
    pub fn new(hosts_path: &Path) -> Self {
        let mut names = Names {
            hosts_path: hosts_path.to_path_buf(),
            hosts_modified: None,
            hosts: HashMap::new(),
            learned: HashMap::new(),
            services: HashMap::new(),
            pods: HashMap::new(),
        };
        names.refresh_hosts();
        names
    }

    /// Reads the hosts file again if it changed since the last read.
    pub fn refresh_hosts(&mut self) {
        let modified = std::fs::metadata(&self.hosts_path)
            .and_then(|m| m.modified())
            .ok();
        if modified.is_some() && modified == self.hosts_modified {
            return;
        }
        self.hosts_modified = modified;
        self.hosts = std::fs::read_to_string(&self.hosts_path)
            .map(|text| parse_hosts(&text))
            .unwrap_or_default();
    }

    /// A DNS answer said `name` has address `ip`, valid for `ttl_s` seconds.
    pub fn learn(&mut self, ip: IpAddr, name: &str, ttl_s: u32, now_ns: u64) {
        let name = name.trim_end_matches('.');
        if name.is_empty() {
            return;
        }
        let keep = (ttl_s as u64 * 1_000_000_000).max(MIN_KEEP_NS);
        if self.learned.len() >= CAPACITY && !self.learned.contains_key(&ip) {
            self.learned.retain(|_, l| l.until_ns > now_ns);
            if self.learned.len() >= CAPACITY {
                // Still full of live names: forget the ones closest to expiry.
                let mut untils: Vec<u64> = self.learned.values().map(|l| l.until_ns).collect();
                let cut = CAPACITY / 10;
                untils.select_nth_unstable(cut);
                let threshold = untils[cut];
                self.learned.retain(|_, l| l.until_ns > threshold);
            }
        }
        self.learned.insert(
            ip,
            Learned {
                name: name.to_string(),
                until_ns: now_ns.saturating_add(keep),
            },
        );
    }

    /// What the Kubernetes API said changed.
    pub fn update_cluster(&mut self, update: crate::kubernetes::Update) {
        let names = match update.kind {
            crate::kubernetes::Kind::Pod => &mut self.pods,
            crate::kubernetes::Kind::Service => &mut self.services,
        };
        if update.reset {
            names.clear();
        }
        for ip in update.removed {
            names.remove(&ip);
        }
        names.extend(update.set);
    }

    /// The name of `ip`, if one is known.
    pub fn lookup(&self, ip: &IpAddr, now_ns: u64) -> Option<&str> {
        self.services
            .get(ip)
            .or_else(|| self.pods.get(ip))
            .map(String::as_str)
            .or_else(|| {
                self.learned
                    .get(ip)
                    .filter(|l| l.until_ns > now_ns)
                    .map(|l| l.name.as_str())
            })
            .or_else(|| self.hosts.get(ip).map(String::as_str))
    }
}

/// Parses a hosts file: address, canonical name, aliases; `#` starts a comment. The first name
/// given for an address wins.
pub fn parse_hosts(text: &str) -> HashMap<IpAddr, String> {
    let mut hosts = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(name)) = (fields.next(), fields.next()) else {
            continue;
        };
        // Zone indexes (fe80::1%eth0) are not part of the address.
        let addr = addr.split('%').next().unwrap_or(addr);
        if let Ok(ip) = addr.parse::<IpAddr>() {
            hosts.entry(ip).or_insert_with(|| name.to_string());
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn hosts_files_are_parsed_forgivingly() {
        let hosts = parse_hosts(
            "127.0.0.1\tlocalhost\n# comment\n10.0.3.7 db.internal db # primary\n\
             10.0.3.7 other\nnot-an-address x\n::1 ip6-localhost\nfe80::1%eth0 router\n10.0.0.9\n",
        );
        let get = |s: &str| hosts.get(&s.parse::<IpAddr>().unwrap()).cloned();
        assert_eq!(get("10.0.3.7").as_deref(), Some("db.internal"));
        assert_eq!(get("::1").as_deref(), Some("ip6-localhost"));
        assert_eq!(get("fe80::1").as_deref(), Some("router"));
        assert_eq!(hosts.len(), 4);
    }

    #[test]
    fn dns_names_win_over_hosts_and_are_kept_at_least_ten_minutes() {
        let dir = std::env::temp_dir().join(format!("resil-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        std::fs::write(&path, "10.0.3.7 from-hosts\n").unwrap();
        let mut names = Names::new(&path);
        let ip: IpAddr = "10.0.3.7".parse().unwrap();
        assert_eq!(names.lookup(&ip, 0), Some("from-hosts"));
        names.learn(ip, "api.example.", 5, 100 * S);
        assert_eq!(names.lookup(&ip, 101 * S), Some("api.example"));
        assert_eq!(names.lookup(&ip, 699 * S), Some("api.example"));
        assert_eq!(names.lookup(&ip, 701 * S), Some("from-hosts"));
        names.learn(ip, "long.example", 3600, 0);
        assert_eq!(names.lookup(&ip, 3000 * S), Some("long.example"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn cluster_names_win_and_follow_their_updates() {
        use crate::kubernetes::{Kind, Update};
        let mut names = Names::new(Path::new("/nonexistent/hosts"));
        let ip: IpAddr = "10.1.0.5".parse().unwrap();
        names.learn(ip, "web-0.web.shop.svc.cluster.local", 30, 0);
        let update = |kind, reset, set: Vec<(IpAddr, String)>, removed| Update {
            kind,
            reset,
            set,
            removed,
        };
        names.update_cluster(update(
            Kind::Pod,
            true,
            vec![(ip, "shop/web-0".into())],
            vec![],
        ));
        assert_eq!(names.lookup(&ip, S), Some("shop/web-0"));
        names.update_cluster(update(
            Kind::Service,
            false,
            vec![(ip, "shop/web".into())],
            vec![],
        ));
        assert_eq!(
            names.lookup(&ip, S),
            Some("shop/web"),
            "a service beats a pod"
        );
        names.update_cluster(update(Kind::Service, false, vec![], vec![ip]));
        names.update_cluster(update(Kind::Pod, true, vec![], vec![]));
        assert_eq!(
            names.lookup(&ip, S),
            Some("web-0.web.shop.svc.cluster.local"),
            "a relist without the pod forgets it"
        );
    }

    #[test]
    fn a_missing_hosts_file_is_empty() {
        let names = Names::new(Path::new("/nonexistent/hosts"));
        assert_eq!(names.lookup(&"10.0.0.1".parse().unwrap(), 0), None);
    }
}
