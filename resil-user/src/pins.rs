//! Pinned state: resil's maps and links live in a bpffs directory (default
//! `/sys/fs/bpf/resil`), so a restarted daemon (upgrade, crash, `systemctl restart`) adopts
//! them and nothing is lost; `resil daemon --cleanup` removes them all.
//!
//! Layout: `maps/v<LAYOUT_VERSION>/<MAP>` and `links/<attachment>`. A daemon holds an
//! exclusive lock on the directory for as long as it runs.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::MapInfo,
    programs::links::{FdLink, PinnedLink},
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
                unpin_link(&entry.path())?;
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
        unpin_link(&entry.path())?;
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
