//! Facts about the host's network: the default-route interface, interface existence.

use std::fs;

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route_interface() -> Option<String> {
    let v4 = fs::read_to_string("/proc/net/route").ok();
    let v6 = fs::read_to_string("/proc/net/ipv6_route").ok();
    v4.as_deref()
        .and_then(default_ipv4_interface)
        .or_else(|| v6.as_deref().and_then(default_ipv6_interface))
}

/// Parses `/proc/net/route`: the first route with destination and mask 0.
pub fn default_ipv4_interface(table: &str) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [iface, "00000000", _gateway, _flags, _, _, _, "00000000", ..] => {
                Some((*iface).to_string())
            }
            _ => None,
        }
    })
}

/// Parses `/proc/net/ipv6_route`: the first route to `::/0` on an interface other than `lo`.
pub fn default_ipv6_interface(table: &str) -> Option<String> {
    const ANY: &str = "00000000000000000000000000000000";
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [dest, "00", .., iface] if *dest == ANY && *iface != "lo" => Some((*iface).to_string()),
            _ => None,
        }
    })
}

/// Whether a network interface of that name exists in this process's network namespace
/// (asked of the kernel, not of /sys, which may show another namespace).
pub fn interface_exists(name: &str) -> bool {
    !name.is_empty() && nix::net::if_::if_nametoindex(name).is_ok()
}

/// Where cgroup v2 is mounted, from a `/proc/mounts` text (the unified hierarchy of a hybrid
/// setup included).
pub fn cgroup2_mount(mounts: &str) -> Option<String> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| path.to_string())
    })
}

/// The cgroup v2 root of this machine.
pub fn cgroup2_root() -> Option<String> {
    cgroup2_mount(&fs::read_to_string("/proc/mounts").ok()?)
}

/// Whether `path` is a directory of a cgroup v2 hierarchy.
pub fn is_cgroup2_dir(path: &std::path::Path) -> bool {
    path.join("cgroup.procs").is_file() && path.join("cgroup.controllers").is_file()
}

/// Link types whose frames start with an Ethernet header, which is what the programs parse.
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

/// The interface's link type (`ARPHRD_*`), asked of the kernel in this network namespace.
pub fn link_type(name: &str) -> std::io::Result<u16> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let bytes = name.as_bytes();
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.len() >= request.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // Any socket will do for the ioctl; it is never bound, so it works with every interface
    // down, loopback included.
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)?;
    // SAFETY: SIOCGIFHWADDR reads the name and writes the hardware address into `request`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the hardware-address member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Whether the programs can parse this interface's frames (Ethernet or loopback).
pub fn has_ethernet_frames(name: &str) -> std::io::Result<bool> {
    link_type(name).map(|t| matches!(t, ARPHRD_ETHER | ARPHRD_LOOPBACK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_ipv4_default_route() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth1\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_ipv4_interface(table).as_deref(), Some("eth1"));
        assert_eq!(default_ipv4_interface("Iface\n"), None);
        assert_eq!(default_ipv4_interface(""), None);
    }

    #[test]
    fn finds_the_ipv6_default_route() {
        let table = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";
        assert_eq!(default_ipv6_interface(table).as_deref(), Some("eth0"));
        assert_eq!(default_ipv6_interface("garbage"), None);
    }

    #[test]
    fn finds_the_cgroup2_mount_also_in_hybrid_setups() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(cgroup2_mount(unified).as_deref(), Some("/sys/fs/cgroup"));
        assert_eq!(cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn rejects_odd_interface_names() {
        assert!(!interface_exists(""));
        assert!(!interface_exists("../../etc"));
        assert!(!interface_exists("definitely-not-an-interface0"));
        assert!(interface_exists("lo"));
    }

    #[test]
    fn loopback_has_ethernet_frames() {
        assert_eq!(link_type("lo").unwrap(), ARPHRD_LOOPBACK);
        assert!(has_ethernet_frames("lo").unwrap());
        assert!(link_type("no-such-if0").is_err());
        assert!(link_type("a-name-far-too-long-for-linux").is_err());
    }
}
