//! Loading resil's BPF programs and attaching them to interfaces and the cgroup. Maps and links
//! are pinned (see [`crate::pins`]): a restarted daemon loads its new programs over the pinned
//! maps and swaps them into the pinned links, so observation and enforcement never stop and
//! nothing counted is lost. Dropping [`Probes`] leaves the pinned attachments in place.

use anyhow::{Context as _, Result};
use std::{fs::File, path::Path};

use aya::{
    maps::Map,
    programs::{
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
        xdp::{XdpLink, XdpMode as XdpFlags},
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use log::{info, warn, LevelFilter};

use crate::{
    error::usage,
    pins::{self, PinDir, TcFilterRecord, PINNED_MAPS},
};

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

/// How to attach the TC egress observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TcMode {
    /// TCX where the kernel has it (Linux 6.6 and later), clsact otherwise.
    #[default]
    Auto,
    /// A TCX link, pinned: fail on kernels without TCX.
    Tcx,
    /// A classic filter on the interface's `clsact` qdisc (added if missing), recorded in the
    /// pin directory; what kernels before 6.6 have.
    Clsact,
}

/// How the observers are attached to one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The interface.
    pub iface: String,
    /// The XDP ingress observer's mode: "native" or "generic".
    pub xdp: &'static str,
    /// The TC egress observer's kind: "tcx" or "clsact".
    pub tc: &'static str,
}

/// The loaded programs and everything they are attached to.
pub struct Probes {
    ebpf: Ebpf,
    pins: PinDir,
    /// The interfaces observed, and how.
    attachments: Vec<Attachment>,
    /// Links pinned or adopted, and TC filters recorded, by this run (file names in the pin
    /// directory's `links`).
    links: Vec<String>,
    /// Links taken over from a previous run.
    adopted: usize,
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
    /// Loads the programs into the kernel (verifier included), over the maps pinned in `pins`
    /// (created and pinned if absent). `bpf_log` sets which kernel log statements are live;
    /// `Off` masks them all at load time.
    pub fn load(bpf_log: LevelFilter, pins: PinDir) -> Result<Probes> {
        let level = bpf_log_level(bpf_log);
        for name in pins.drop_mismatched_maps(OBJECT)? {
            warn!("the pinned map {name} has another layout than this version's: it starts empty");
        }
        if pins.has_maps() {
            info!("adopting the maps pinned in {}", pins.root().display());
        }
        let paths: Vec<(&str, std::path::PathBuf)> = PINNED_MAPS
            .iter()
            .map(|name| (*name, pins.map_path(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader.override_global("AYA_LOG_LEVEL", &level, true);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(OBJECT).context(
            "cannot load resil's BPF programs (needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and a kernel with BPF and BTF)",
        )?;
        let mut probes = Probes {
            ebpf,
            pins,
            attachments: Vec::new(),
            links: Vec::new(),
            adopted: 0,
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

    /// The interfaces observed, and how.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Attaches the observers to `iface`: XDP on ingress (native where the driver has it,
    /// generic otherwise), TC on egress (TCX on kernels ≥ 6.6, else a filter on the `clsact`
    /// qdisc); the modes can insist on one.
    pub fn attach(&mut self, iface: &str, xdp: XdpMode, tc: TcMode) -> Result<()> {
        let ifindex = crate::netinfo::ifindex(iface)
            .with_context(|| format!("cannot find the index of interface {iface}"))?;
        let xdp = self.attach_xdp(iface, ifindex, xdp)?;
        let tc = self.attach_tc(iface, ifindex, tc)?;
        self.attachments.push(Attachment {
            iface: iface.to_string(),
            xdp,
            tc,
        });
        Ok(())
    }

    fn attach_xdp(&mut self, iface: &str, ifindex: u32, mode: XdpMode) -> Result<&'static str> {
        let veth = crate::netinfo::driver(iface).is_some_and(|d| d == "veth");
        // A link pinned by a previous run, in a mode this one accepts: swap the program in.
        let accepted: &[&str] = match mode {
            XdpMode::Native => &["native"],
            XdpMode::Generic => &["generic"],
            XdpMode::Auto if veth => &["generic"],
            XdpMode::Auto => &["native", "generic"],
        };
        for used in accepted {
            let pin = pins::interface_link(&format!("xdp-{used}"), iface, ifindex);
            let path = self.pins.link_path(&pin);
            let Ok(pinned) = aya::programs::links::PinnedLink::from_pin(&path) else {
                continue;
            };
            let program = self.program::<Xdp>(XDP_INGRESS)?;
            let replaced = XdpLink::try_from(FdLink::from(pinned))
                .map_err(anyhow::Error::from)
                .and_then(|link| Ok(program.attach_to_link(link)?));
            match replaced {
                Ok(_) => {
                    self.adopted += 1;
                    self.links.push(pin);
                    return Ok(used);
                }
                Err(e) => {
                    warn!("cannot reuse the pinned XDP link on {iface} ({e:#}): attaching anew")
                }
            }
        }
        // Whatever a previous run left on this interface (another mode, or a link that would
        // not take the new program) goes first: an interface holds one XDP program, and one
        // mode at a time. Ingress goes unobserved until the new program is attached.
        for used in ["native", "generic"] {
            let path = self.pins.link_path(&pins::interface_link(
                &format!("xdp-{used}"),
                iface,
                ifindex,
            ));
            if let Some(old) = pins::take_pinned_link(&path) {
                info!("detaching the {used} XDP program a previous run left on {iface}");
                drop(old);
            }
        }
        let program = self.program::<Xdp>(XDP_INGRESS)?;
        let native = match mode {
            XdpMode::Generic => None,
            XdpMode::Auto if veth => None,
            XdpMode::Native | XdpMode::Auto => Some(program.attach(iface, XdpFlags::Driver)),
        };
        let (id, used) = match (native, mode) {
            (Some(Ok(id)), _) => (id, "native"),
            (Some(Err(e)), XdpMode::Native) => {
                return Err(e).with_context(|| {
                    format!("cannot attach {XDP_INGRESS} to {iface} in native mode (the driver may not support XDP; try --xdp-mode generic)")
                })
            }
            _ => {
                let id = program.attach(iface, XdpFlags::Skb).with_context(|| {
                    format!("cannot attach {XDP_INGRESS} to interface {iface} (an interface holds one XDP program: is another tool's there?)")
                })?;
                (id, "generic")
            }
        };
        let link = FdLink::try_from(program.take_link(id)?)
            .context("the kernel attached XDP without a BPF link (needs Linux 5.9 or later)")?;
        let pin = pins::interface_link(&format!("xdp-{used}"), iface, ifindex);
        self.pin(link, &pin)?;
        Ok(used)
    }

    /// Pins a new link, so it outlives this process.
    fn pin(&mut self, link: FdLink, pin: &str) -> Result<()> {
        let path = self.pins.link_path(pin);
        link.pin(&path)
            .with_context(|| format!("cannot pin {}", path.display()))?;
        self.links.push(pin.to_string());
        Ok(())
    }

    /// Attaches the egress observer. Switching kinds (an upgrade of the kernel, another
    /// `--tc-mode`) attaches the new one before the previous run's goes, as a replacement of
    /// the same kind does: for an instant both observe, and no packet goes unobserved.
    fn attach_tc(&mut self, iface: &str, ifindex: u32, mode: TcMode) -> Result<&'static str> {
        let tcx = match mode {
            TcMode::Auto => has_tcx(),
            TcMode::Tcx if !has_tcx() => {
                return Err(usage(
                    "--tc-mode tcx needs Linux 6.6 or later; use --tc-mode clsact (or auto)",
                ))
            }
            TcMode::Tcx => true,
            TcMode::Clsact => false,
        };
        let link_pin = pins::interface_link("tc-egress", iface, ifindex);
        let filters = self.pins.tc_filter_records(iface, ifindex)?;
        if tcx {
            self.attach_tcx(iface, &link_pin)?;
            for name in filters {
                self.pins.release(&name)?;
            }
            return Ok("tcx");
        }
        let previous = pins::take_pinned_link(&self.pins.link_path(&link_pin));
        let attached = self.attach_clsact(iface, ifindex)?;
        if previous.is_some() || !filters.is_empty() {
            self.adopted += 1;
        }
        // A record naming the new filter is of one that is gone (the kernel gave its place to
        // this one: someone removed the qdisc, say); it now records the new one.
        for name in filters.iter().filter(|name| **name != attached) {
            self.pins.release(name)?;
        }
        drop(previous);
        Ok("clsact")
    }

    /// A classic filter on the `clsact` qdisc (added if missing, and left in place: empty, it
    /// does nothing). It stays attached after this process exits, as a pinned link would;
    /// its record in the pin directory says where it is.
    /// Returns the record's name.
    fn attach_clsact(&mut self, iface: &str, ifindex: u32) -> Result<String> {
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => {}
            // Already there (from a previous run, or someone else's): shared, as tc shares it.
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot add the clsact qdisc to {iface}"))
            }
        }
        let program = self.program::<SchedClassifier>(TC_EGRESS)?;
        let id = program
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .with_context(|| format!("cannot attach {TC_EGRESS} to the clsact qdisc of {iface}"))?;
        let link = program.take_link(id)?;
        let record = TcFilterRecord::new(iface, ifindex, &link)?;
        // Dropping the link would detach the filter: it is to outlive this process.
        std::mem::forget(link);
        let name = self.pins.record_tc_filter(&record)?;
        self.links.push(name.clone());
        Ok(name)
    }

    /// A TCX link, pinned; a previous run's is given the new program atomically.
    fn attach_tcx(&mut self, iface: &str, pin: &str) -> Result<()> {
        let path = self.pins.link_path(pin);
        let program = self.program::<SchedClassifier>(TC_EGRESS)?;
        if let Ok(pinned) = aya::programs::links::PinnedLink::from_pin(&path) {
            let replaced = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(anyhow::Error::from)
                .and_then(|link| Ok(program.attach_to_link(link)?));
            match replaced {
                Ok(_) => {
                    self.adopted += 1;
                    self.links.push(pin.to_string());
                    return Ok(());
                }
                Err(e) => {
                    warn!("cannot reuse the pinned TC link on {iface} ({e:#}): attaching anew")
                }
            }
        }
        // A pinned link that would not take the new program stays attached (TCX holds several)
        // until the new one is pinned in its place.
        let previous = pins::take_pinned_link(&path);
        let program = self.program::<SchedClassifier>(TC_EGRESS)?;
        let id = program
            .attach(iface, TcAttachType::Egress)
            .with_context(|| format!("cannot attach {TC_EGRESS} to interface {iface}"))?;
        let link = FdLink::try_from(program.take_link(id)?)
            .context("the TC program was attached without a BPF link")?;
        self.pin(link, pin)?;
        drop(previous);
        Ok(())
    }

    /// Attaches the connect hooks to a cgroup v2 directory: sockets of processes in it (and
    /// below) are refused at `connect()` when their endpoint's circuit is open. The hooks
    /// attach as BPF links (kernel ≥ 5.7), which leave other programs on the cgroup alone
    /// whatever the attach mode. A previous run's links stay attached until the new ones are,
    /// so no connect() goes unchecked in between.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let dir = File::open(cgroup)
            .with_context(|| format!("cannot open the cgroup {}", cgroup.display()))?;
        for name in CONNECT_PROGRAMS {
            let pin = name.trim_start_matches("resil_").to_string();
            let previous = pins::take_pinned_link(&self.pins.link_path(&pin));
            let program = self.program::<CgroupSockAddr>(name)?;
            let id = program
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| {
                    format!("cannot attach {name} to the cgroup {}", cgroup.display())
                })?;
            let link = FdLink::try_from(program.take_link(id)?)
                .context("the cgroup program was attached without a BPF link")?;
            self.pin(link, &pin)?;
            if previous.is_some() {
                self.adopted += 1;
            }
            drop(previous);
        }
        Ok(())
    }

    /// After attaching: removes what a previous run pinned and this one does not use, and
    /// says what was adopted.
    pub fn finish_adoption(&mut self) -> Result<()> {
        let removed = self.pins.remove_stale(&self.links)?;
        if self.adopted > 0 {
            info!(
                "replaced the programs of {} pinned attachments in {}",
                self.adopted,
                self.pins.root().display()
            );
        }
        if !removed.is_empty() {
            info!(
                "removed pinned state no longer used: {}",
                removed.join(", ")
            );
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
