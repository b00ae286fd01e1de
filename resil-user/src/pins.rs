//! Pinned state: resil's maps and links live in a bpffs directory (default
//! `/sys/fs/bpf/resil`), so a restarted daemon (upgrade, crash, `systemctl restart`) adopts
//! them and nothing is lost; `resil daemon --cleanup` removes them all.
//!
//! Layout: `maps/v<LAYOUT_VERSION>/<MAP>` and `links/<attachment>`: a pinned BPF link, or
//! for a classic TC filter (which cannot be pinned) an empty directory whose name records it
//! ([`TcFilterRecord`]). A daemon holds an exclusive lock on the directory for as long as it
//! runs.

use std::{
    fs::{self, File},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::MapInfo,
    programs::{
        links::{FdLink, Link as _, PinnedLink},
        tc::{SchedClassifierLink, TcHandle},
        ProgramError, TcAttachType,
    },
};
use log::warn;
use nix::fcntl::{Flock, FlockArg};
use resil_common::maps::names;

use crate::error::usage;

/// Where the daemon pins its state unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/resil";

/// Bump when a map's meaning changes while its sizes do not: maps pinned under another
/// version are then not adopted.
const LAYOUT_VERSION: u32 = 1;

/// The maps that outlive the daemon: all but the log ring buffer and global data.
pub const PINNED_MAPS: [&str; 9] = [
    names::CONNECTIONS,
    names::ENDPOINTS,
    names::HANDSHAKES,
    names::DNS,
    names::DNS_QUERIES,
    names::HEALTH,
    names::VERDICTS,
    names::TOKENS,
    names::BREAKERS,
];

/// A pin directory, locked by this process.
pub struct PinDir {
    root: PathBuf,
    /// Held for the daemon's life: a second daemon on the same directory fails at once.
    _lock: Flock<File>,
}

/// Opens `root` and takes its lock; fails if another daemon holds it.
fn lock(root: &Path) -> Result<Flock<File>> {
    let dir = File::open(root).with_context(|| format!("cannot open {}", root.display()))?;
    Flock::lock(dir, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            anyhow!(
                "another resil daemon is using the pin directory {} (stop it first)",
                root.display()
            )
        } else {
            anyhow!("cannot lock the pin directory {}: {errno}", root.display())
        }
    })
}

fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}

impl PinDir {
    /// Creates the directory (and its `maps` and `links` parts) on a BPF filesystem and locks
    /// it.
    pub fn open(root: &Path) -> Result<PinDir> {
        let parent = root.parent().unwrap_or(Path::new("/"));
        if !on_bpffs(root) && !on_bpffs(parent) {
            return Err(usage(format!(
                "{} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose another --pin-dir",
                root.display()
            )));
        }
        create_dir(root)?;
        let pins = PinDir {
            root: root.to_path_buf(),
            _lock: lock(root)?,
        };
        create_dir(&pins.maps_dir())?;
        create_dir(&pins.links_dir())?;
        Ok(pins)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps").join(format!("v{LAYOUT_VERSION}"))
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Where map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Where the link of an attachment is pinned.
    pub fn link_path(&self, attachment: &str) -> PathBuf {
        self.links_dir().join(attachment)
    }

    /// The names of the TC filter records for `iface` (with index `ifindex`) in this network
    /// namespace: the filters a previous run attached there.
    pub fn tc_filter_records(&self, iface: &str, ifindex: u32) -> Result<Vec<String>> {
        let here = network_namespace()?;
        Ok(read_dir(&self.links_dir())?
            .iter()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| {
                TcFilterRecord::parse(name)
                    .is_some_and(|r| r.iface == iface && r.ifindex == ifindex && r.netns == here)
            })
            .collect())
    }

    /// Records a TC filter just attached; returns the record's name in `links/`.
    pub fn record_tc_filter(&self, record: &TcFilterRecord) -> Result<String> {
        let name = record.file_name();
        let path = self.link_path(&name);
        match fs::create_dir(&path) {
            // Left by a filter that is gone: the new one has its place.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(name),
            Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
            Ok(()) => Ok(name),
        }
    }

    /// Ends the attachment `name` in `links/` (see [`release`]).
    pub fn release(&self, name: &str) -> Result<()> {
        release(&self.link_path(name))
    }

    /// Whether any map is pinned already (a previous daemon ran).
    pub fn has_maps(&self) -> bool {
        PINNED_MAPS.iter().any(|name| self.map_path(name).exists())
    }

    /// Unpins maps whose kernel shape (type, key and value size, capacity) differs from the
    /// object's, so they start fresh instead of being misread. Returns their names.
    pub fn drop_mismatched_maps(&self, object: &[u8]) -> Result<Vec<&'static str>> {
        let parsed = aya_obj::Object::parse(object).context("cannot parse resil's BPF object")?;
        let mut dropped = Vec::new();
        for name in PINNED_MAPS {
            let path = self.map_path(name);
            if !path.exists() {
                continue;
            }
            let def = parsed
                .maps
                .get(name)
                .with_context(|| format!("the BPF object has no map {name}"))?;
            let same = MapInfo::from_pin(&path).is_ok_and(|info| {
                info.key_size() == def.key_size()
                    && info.value_size() == def.value_size()
                    && info.max_entries() == def.max_entries()
                    && info.map_type().ok().map(|t| t as u32) == Some(def.map_type())
            });
            if !same {
                fs::remove_file(&path)
                    .with_context(|| format!("cannot unpin {}", path.display()))?;
                dropped.push(name);
            }
        }
        Ok(dropped)
    }

    /// Unpins (and so detaches) every pinned link not in `keep`, and removes maps of other
    /// layout versions: what the previous run had and this one no longer uses.
    pub fn remove_stale(&self, keep: &[String]) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for entry in read_dir(&self.links_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                release(&entry.path())?;
                removed.push(name);
            }
        }
        let current = self.maps_dir();
        for entry in read_dir(&self.root.join("maps"))? {
            if entry.path() != current {
                remove_maps(&entry.path())?;
                removed.push(format!("maps/{}", entry.file_name().to_string_lossy()));
            }
        }
        Ok(removed)
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(|e| e.ok()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot list {}", dir.display())),
    }
}

/// Ends an attachment recorded in `links/`: detaches a recorded TC filter and removes its
/// record, or unpins a link.
fn release(path: &Path) -> Result<()> {
    let record = path
        .file_name()
        .and_then(|name| TcFilterRecord::parse(&name.to_string_lossy()));
    match record {
        Some(record) if path.is_dir() => {
            record.detach()?;
            fs::remove_dir(path).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => unpin_link(path),
    }
}

/// Unpins a link; the attachment ends when the last reference (this one) closes.
fn unpin_link(path: &Path) -> Result<()> {
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            let link: FdLink = link
                .unpin()
                .with_context(|| format!("cannot unpin {}", path.display()))?;
            drop(link);
            Ok(())
        }
        // Not a link (or already gone): the file is all there is to remove.
        Err(_) => remove_file(path),
    }
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn remove_maps(dir: &Path) -> Result<()> {
    for entry in read_dir(dir)? {
        remove_file(&entry.path())?;
    }
    fs::remove_dir(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

/// Takes the pinned link at `path` out of its pin, keeping it attached while the returned
/// link lives: the caller attaches the replacement, then drops this one.
pub fn take_pinned_link(path: &Path) -> Option<FdLink> {
    let link = PinnedLink::from_pin(path).ok()?;
    match link.unpin() {
        Ok(link) => Some(link),
        Err(e) => {
            warn!("cannot unpin {}: {e}", path.display());
            None
        }
    }
}

/// The name in `links/` of an attachment of `kind` (`xdp-native`, `tc-egress`, …) to an
/// interface: `<kind>@<iface>#<ifindex>`, so that a recreated interface (another index) is
/// told apart from the one the attachment was made to.
pub fn interface_link(kind: &str, iface: &str, ifindex: u32) -> String {
    format!("{kind}@{iface}#{ifindex}")
}

/// The network namespace this process is in (the inode of `/proc/self/ns/net`).
fn network_namespace() -> Result<u64> {
    let path = "/proc/self/ns/net";
    Ok(fs::metadata(path)
        .with_context(|| format!("cannot read {path} (is /proc mounted?)"))?
        .ino())
}

/// A classic TC egress filter resil attached (kernels without TCX, or `--tc-mode clsact`).
/// Such a filter cannot be pinned but stays attached after the daemon exits; its record, an
/// empty directory in `links/` named by [`TcFilterRecord::file_name`], lets the next run
/// replace it and `--cleanup` detach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilterRecord {
    /// Interface name and index: both must match for the filter to be the one recorded.
    pub iface: String,
    pub ifindex: u32,
    /// The network namespace the interface is in (the inode of its `ns/net`).
    pub netns: u64,
    /// Where the filter sits in the egress chain: its priority and handle.
    pub priority: u16,
    pub handle: u32,
}

/// The kind of [`interface_link`] a record is named as.
const TC_FILTER: &str = "tc-filter";

impl TcFilterRecord {
    /// The record of a filter just attached to `iface` in this network namespace.
    pub fn new(iface: &str, ifindex: u32, link: &SchedClassifierLink) -> Result<Self> {
        Ok(TcFilterRecord {
            iface: iface.to_string(),
            ifindex,
            netns: network_namespace()?,
            priority: link
                .priority()
                .context("a TC filter link without a priority")?,
            handle: link
                .handle()
                .context("a TC filter link without a handle")?
                .into(),
        })
    }

    /// `tc-filter@<iface>#<ifindex>,netns=<inode>,prio=<priority>,handle=<handle>`.
    pub fn file_name(&self) -> String {
        format!(
            "{},netns={},prio={},handle={:#x}",
            interface_link(TC_FILTER, &self.iface, self.ifindex),
            self.netns,
            self.priority,
            self.handle
        )
    }

    /// The record a file name holds, if it is one (interface names may hold `,` and `#`:
    /// the fields are read from the right).
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(TC_FILTER)?.strip_prefix('@')?;
        let mut fields = rest.rsplitn(4, ',');
        let handle = fields.next()?.strip_prefix("handle=0x")?;
        let priority = fields.next()?.strip_prefix("prio=")?;
        let netns = fields.next()?.strip_prefix("netns=")?;
        let (iface, ifindex) = fields.next()?.rsplit_once('#')?;
        Some(TcFilterRecord {
            iface: iface.to_string(),
            ifindex: ifindex.parse().ok()?,
            netns: netns.parse().ok()?,
            priority: priority.parse().ok()?,
            handle: u32::from_str_radix(handle, 16).ok()?,
        })
    }

    /// Detaches the recorded filter; one already gone (with its interface, or by hand) is
    /// fine. A filter in another network namespace cannot be reached: it stays, with a
    /// warning, until its interface goes.
    pub fn detach(&self) -> Result<()> {
        if self.netns != network_namespace()? {
            warn!(
                "the TC filter resil attached to {} is in another network namespace: it stays until that interface goes (or run --cleanup in that namespace)",
                self.iface
            );
            return Ok(());
        }
        if crate::netinfo::ifindex(&self.iface) != Some(self.ifindex) {
            // The interface went, and its filters with it (another may have taken its name).
            return Ok(());
        }
        let link = SchedClassifierLink::attached(
            &self.iface,
            TcAttachType::Egress,
            self.priority,
            TcHandle::from(self.handle),
            None,
        )
        .with_context(|| format!("cannot find interface {}", self.iface))?;
        match link.detach() {
            // ENOENT: no such filter; EINVAL: no clsact qdisc ("Parent Qdisc doesn't exist"),
            // so no filter either.
            Err(ProgramError::NetlinkError(e))
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ENOENT | nix::libc::EINVAL)
                ) =>
            {
                Ok(())
            }
            other => other.with_context(|| {
                format!(
                    "cannot detach the TC filter resil attached to {}",
                    self.iface
                )
            }),
        }
    }
}

/// What `resil daemon --cleanup` removed.
#[derive(Debug, Default)]
pub struct Removed {
    /// Links unpinned (their programs detached).
    pub links: Vec<String>,
    /// Maps unpinned.
    pub maps: usize,
}

/// Detaches and removes everything pinned under `root`, then `root` itself. Refuses while a
/// daemon holds the directory.
pub fn cleanup(root: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    if !root.exists() {
        return Ok(removed);
    }
    if !on_bpffs(root) {
        return Err(usage(format!(
            "{} is not on a BPF filesystem: not a resil pin directory (--pin-dir)",
            root.display()
        )));
    }
    let _lock = lock(root)?;
    for entry in read_dir(&root.join("links"))? {
        release(&entry.path())?;
        removed
            .links
            .push(entry.file_name().to_string_lossy().into_owned());
    }
    for dir in read_dir(&root.join("maps"))? {
        removed.maps += read_dir(&dir.path())?.len();
        remove_maps(&dir.path())?;
    }
    for dir in [root.join("links"), root.join("maps")] {
        if dir.exists() {
            fs::remove_dir(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    fs::remove_dir(root)
        .with_context(|| format!("cannot remove {} (something else is in it)", root.display()))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_tc_filter_record_reads_back_from_its_name() {
        let record = TcFilterRecord {
            iface: "eth0".into(),
            ifindex: 2,
            netns: 4026531840,
            priority: 49152,
            handle: 1,
        };
        let name = record.file_name();
        assert_eq!(
            name,
            "tc-filter@eth0#2,netns=4026531840,prio=49152,handle=0x1"
        );
        assert_eq!(TcFilterRecord::parse(&name), Some(record));
        for other in [
            "tc-egress@eth0#2",
            "xdp-generic@eth0#2",
            "connect4",
            "tc-filter@eth0#2,netns=1,prio=70000,handle=0x1",
            "tc-filter@eth0,netns=1,prio=1,handle=0x1",
            "tc-filter@eth0#2,netns=1,prio=1,handle=1",
        ] {
            assert_eq!(TcFilterRecord::parse(other), None, "{other}");
        }
    }

    proptest! {
        /// Interface names may hold `#` and `,` (the kernel forbids only `/`, `:` and
        /// whitespace): the record still reads back.
        #[test]
        fn any_record_reads_back(
            iface in "[a-z0-9#,._-]{1,15}",
            ifindex: u32,
            netns: u64,
            priority: u16,
            handle: u32,
        ) {
            let record = TcFilterRecord { iface, ifindex, netns, priority, handle };
            prop_assert_eq!(TcFilterRecord::parse(&record.file_name()), Some(record));
        }
    }
}
