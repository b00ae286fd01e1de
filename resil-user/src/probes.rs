//! Loading resil's BPF programs and attaching them to interfaces. Everything attached is
//! detached when [`Probes`] is dropped: on shutdown, on a start-up error, on a panic.

use anyhow::{Context as _, Result};
use std::{fs::File, path::Path};

use aya::{
    maps::Map,
    programs::{
        tc, xdp::XdpMode as XdpFlags, CgroupAttachMode, CgroupSockAddr, SchedClassifier,
        TcAttachType, Xdp,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use log::LevelFilter;

/// The compiled BPF object, embedded in the binary.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/resil"));

/// The egress observer (TC).
const TC_EGRESS: &str = "resil_tc_egress";
/// The ingress observer and shedder (XDP).
const XDP_INGRESS: &str = "resil_xdp_ingress";

/// cgroup connect programs in the object.
const CONNECT_PROGRAMS: [&str; 2] = ["resil_connect4", "resil_connect6"];

/// How to attach the XDP observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpMode {
    /// Native (in the driver) where it works, generic otherwise; generic on veth, where
    /// native XDP would change the peer (no GSO) and drop the RSTs of shedding unless the
    /// peer runs XDP or GRO.
    #[default]
    Auto,
    /// Native only: fail if the driver cannot.
    Native,
    /// Generic (after the socket buffer is built): works on every interface.
    Generic,
}

/// The loaded programs and everything they are attached to.
pub struct Probes {
    ebpf: Ebpf,
    /// Interfaces where resil added the `clsact` qdisc (kernels without TCX), to remove it.
    added_qdiscs: Vec<String>,
    /// Interfaces with the XDP observer, and in which mode.
    xdp_modes: Vec<(String, &'static str)>,
}

fn rejected(name: &str) -> String {
    format!("the kernel rejected the BPF program {name}")
}

/// The value of aya-log's `AYA_LOG_LEVEL` global for a log filter: 0 masks every statement.
fn bpf_log_level(filter: LevelFilter) -> u8 {
    match filter {
        LevelFilter::Off => 0,
        LevelFilter::Error => 1,
        LevelFilter::Warn => 2,
        LevelFilter::Info => 3,
        LevelFilter::Debug => 4,
        LevelFilter::Trace => 5,
    }
}

/// Whether the kernel attaches TC programs with TCX links (6.6 and later), as aya does.
fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

impl Probes {
    /// Loads the programs into the kernel (verifier included). `bpf_log` sets which kernel log
    /// statements are live; `Off` masks them all at load time.
    pub fn load(bpf_log: LevelFilter) -> Result<Probes> {
        let level = bpf_log_level(bpf_log);
        let ebpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &level, true)
            .load(OBJECT)
            .context(
                "cannot load resil's BPF programs (needs root and a kernel with BPF and BTF)",
            )?;
        let mut probes = Probes {
            ebpf,
            added_qdiscs: Vec::new(),
            xdp_modes: Vec::new(),
        };
        probes
            .program::<SchedClassifier>(TC_EGRESS)?
            .load()
            .with_context(|| rejected(TC_EGRESS))?;
        probes
            .program::<Xdp>(XDP_INGRESS)?
            .load()
            .with_context(|| rejected(XDP_INGRESS))?;
        for name in CONNECT_PROGRAMS {
            probes
                .program::<CgroupSockAddr>(name)?
                .load()
                .with_context(|| rejected(name))?;
        }
        Ok(probes)
    }

    /// A program of the object, as its type.
    fn program<'a, P>(&'a mut self, name: &str) -> Result<&'a mut P>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let program = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("the BPF object has no program {name}"))?;
        program
            .try_into()
            .with_context(|| format!("the BPF program {name} is not of the expected type"))
    }

    /// How the XDP observer is attached on each interface: (interface, "native" or "generic").
    pub fn xdp_modes(&self) -> &[(String, &'static str)] {
        &self.xdp_modes
    }

    /// Attaches the observers to `iface`: XDP on ingress (native where the driver has it,
    /// generic otherwise; `mode` can insist on one), TC on egress (TCX on kernels ≥ 6.6, else
    /// the `clsact` qdisc, which is removed again on drop if resil added it).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        self.attach_xdp(iface, mode)?;
        self.attach_tc(iface)
    }

    fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        let veth = crate::netinfo::driver(iface).is_some_and(|d| d == "veth");
        let program = self.program::<Xdp>(XDP_INGRESS)?;
        let native = match mode {
            XdpMode::Generic => None,
            XdpMode::Auto if veth => None,
            XdpMode::Native | XdpMode::Auto => Some(program.attach(iface, XdpFlags::Driver)),
        };
        let used = match (native, mode) {
            (Some(Ok(_)), _) => "native",
            (Some(Err(e)), XdpMode::Native) => {
                return Err(e).with_context(|| {
                    format!("cannot attach {XDP_INGRESS} to {iface} in native mode (the driver may not support XDP; try --xdp-mode generic)")
                })
            }
            _ => {
                program.attach(iface, XdpFlags::Skb).with_context(|| {
                    format!("cannot attach {XDP_INGRESS} to interface {iface} (an interface holds one XDP program: is another tool's there?)")
                })?;
                "generic"
            }
        };
        self.xdp_modes.push((iface.to_string(), used));
        Ok(())
    }

    fn attach_tc(&mut self, iface: &str) -> Result<()> {
        if !has_tcx() {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => self.added_qdiscs.push(iface.to_string()),
                // Already there (someone else's): leave it as found.
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot add the clsact qdisc to {iface}"))
                }
            }
        }
        self.program::<SchedClassifier>(TC_EGRESS)?
            .attach(iface, TcAttachType::Egress)
            .with_context(|| format!("cannot attach {TC_EGRESS} to interface {iface}"))?;
        Ok(())
    }

    /// Attaches the connect hooks to a cgroup v2 directory: sockets of processes in it (and
    /// below) are refused at `connect()` when their endpoint's circuit is open. The hooks
    /// attach as BPF links (kernel ≥ 5.7), which leave other programs on the cgroup alone
    /// whatever the attach mode; the mode's flags are only for the legacy attach.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let dir = File::open(cgroup)
            .with_context(|| format!("cannot open the cgroup {}", cgroup.display()))?;
        for name in CONNECT_PROGRAMS {
            self.program::<CgroupSockAddr>(name)?
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| {
                    format!("cannot attach {name} to the cgroup {}", cgroup.display())
                })?;
        }
        Ok(())
    }

    /// Takes a map out of the object, for the collector to own.
    pub fn take_map(&mut self, name: &str) -> Result<Map> {
        self.ebpf
            .take_map(name)
            .with_context(|| format!("the BPF object has no map {name}"))
    }

    /// Starts forwarding kernel log records (aya-log) to the `log` crate.
    pub fn take_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("cannot read the BPF log ring buffer")
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        // Programs and their links are detached when `ebpf` drops; qdiscs need removing.
        for iface in &self.added_qdiscs {
            let status = std::process::Command::new("tc")
                .args(["qdisc", "del", "dev", iface, "clsact"])
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                log::warn!("could not remove the clsact qdisc resil added to {iface}");
            }
        }
    }
}
