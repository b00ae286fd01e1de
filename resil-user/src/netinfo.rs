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
    ifindex(name).is_some()
}

/// The index of a network interface in this process's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    if name.is_empty() {
        return None;
    }
    nix::net::if_::if_nametoindex(name).ok()
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

/// Runs an interface ioctl on `request` (its name filled in from `name`) over a throwaway
/// socket: never bound, so it works with every interface, down or loopback.
fn interface_ioctl(
    name: &str,
    code: nix::libc::c_ulong,
    request: &mut nix::libc::ifreq,
) -> std::io::Result<()> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let bytes = name.as_bytes();
    if bytes.len() >= request.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)?;
    // SAFETY: the caller's request matches `code`; the kernel reads the name and writes the
    // answer into the request (or where it points).
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), code, request as *mut libc::ifreq) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The interface's link type (`ARPHRD_*`), asked of the kernel in this network namespace.
pub fn link_type(name: &str) -> std::io::Result<u16> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    interface_ioctl(name, nix::libc::SIOCGIFHWADDR, &mut request)?;
    // SAFETY: the kernel filled the hardware-address member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// `struct ethtool_drvinfo` of <linux/ethtool.h>.
#[repr(C)]
struct DriverInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The interface's driver (`veth`, `virtio_net`, `mlx5_core` …), if it says.
pub fn driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: nix::libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // SAFETY: plain old data; all zeroes is valid.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut request: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    request.ifr_ifru.ifru_data = (&mut info as *mut DriverInfo).cast();
    interface_ioctl(name, SIOCETHTOOL, &mut request).ok()?;
    let end = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    let driver = String::from_utf8_lossy(&info.driver[..end]).into_owned();
    (!driver.is_empty()).then_some(driver)
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
    fn drivers_are_named_where_the_interface_says() {
        // Loopback answers no driver query; a missing interface has none.
        assert_eq!(driver("no-such-if0"), None);
        let _ = driver("lo");
    }

    #[test]
    fn loopback_has_ethernet_frames() {
        assert_eq!(link_type("lo").unwrap(), ARPHRD_LOOPBACK);
        assert!(has_ethernet_frames("lo").unwrap());
        assert!(link_type("no-such-if0").is_err());
        assert!(link_type("a-name-far-too-long-for-linux").is_err());
    }
}
