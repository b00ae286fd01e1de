//! What the labs of this process made, so an interrupted run (Ctrl-C during a benchmark or the
//! demo) can still remove it: namespaces, cgroups, processes started in them, and the daemons'
//! pinned state.

use std::{
    path::PathBuf,
    sync::{Mutex, MutexGuard},
};

#[derive(Default)]
struct Made {
    namespaces: Vec<String>,
    cgroups: Vec<PathBuf>,
    processes: Vec<u32>,
    pin_dirs: Vec<PathBuf>,
}

static MADE: Mutex<Made> = Mutex::new(Made {
    namespaces: Vec::new(),
    cgroups: Vec::new(),
    processes: Vec::new(),
    pin_dirs: Vec::new(),
});

fn made() -> MutexGuard<'static, Made> {
    MADE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Remembers a network namespace a lab made.
pub fn namespace(name: &str) {
    made().namespaces.push(name.to_string());
}

/// Remembers a cgroup a lab made.
pub fn cgroup(path: &std::path::Path) {
    made().cgroups.push(path.to_path_buf());
}

/// Remembers a process started for a lab (a daemon, a proxy, a server).
pub fn process(pid: u32) {
    made().processes.push(pid);
}

/// Remembers the pin directory of a lab's daemon.
pub fn pin_dir(path: &std::path::Path) {
    made().pin_dirs.push(path.to_path_buf());
}

/// Forgets a pin directory removed the ordinary way.
pub fn forget_pin_dir(path: &std::path::Path) {
    made().pin_dirs.retain(|p| p != path);
}

/// Forgets what was removed the ordinary way.
pub fn forget(namespaces: &[&str], cgroup: Option<&std::path::Path>, pid: Option<u32>) {
    let mut m = made();
    m.namespaces.retain(|n| !namespaces.contains(&n.as_str()));
    if let Some(c) = cgroup {
        m.cgroups.retain(|p| p != c);
    }
    if let Some(pid) = pid {
        m.processes.retain(|p| *p != pid);
    }
}

static CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the process is being cleaned up: no new lab may start.
pub fn closed() -> bool {
    CLOSED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Removes everything still remembered, twice (what was being made meanwhile goes too), and
/// lets no new lab start.
pub fn everything() {
    CLOSED.store(true, std::sync::atomic::Ordering::SeqCst);
    remove_remembered();
    remove_remembered();
}

/// Processes get SIGTERM, processes in the cgroups are killed, the daemons' pinned state is
/// removed, then the namespaces and cgroups go.
fn remove_remembered() {
    let m = std::mem::take(&mut *made());
    for pid in &m.processes {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    for cgroup in &m.cgroups {
        let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    for dir in &m.pin_dirs {
        let _ = crate::cleanup_pins(dir);
    }
    for ns in &m.namespaces {
        let _ = crate::sh("ip", &["netns", "del", ns]);
    }
    for cgroup in &m.cgroups {
        let _ = std::fs::remove_dir(cgroup);
    }
}
