//! The data path: nanoseconds per packet of each program and packet class, on synthetic
//! packets (`BPF_PROG_TEST_RUN`) and under real traffic (the kernel's own statistics).

use anyhow::{Context as _, Result};
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
    Ebpf, EbpfLoader,
};
use resil_common::packet::{
    build::{tcp_frame, udp_frame, Addr},
    tcp_flags::{ACK, RST, SYN},
};

use super::{Plan, Section};

const CLIENT4: Addr = Addr::V4([10, 9, 0, 1]);
const SERVER4: Addr = Addr::V4([10, 9, 0, 2]);
const CLIENT6: Addr = Addr::V6([0xfd, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
const SERVER6: Addr = Addr::V6([0xfd, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);

fn load() -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .override_global("AYA_LOG_LEVEL", &0u8, true)
        .load(resil_user::probes::OBJECT)
        .context("load the BPF object")?;
    let p: &mut SchedClassifier = ebpf
        .program_mut("resil_tc_egress")
        .context("no egress program")?
        .try_into()?;
    p.load()?;
    let p: &mut Xdp = ebpf
        .program_mut("resil_xdp_ingress")
        .context("no ingress program")?
        .try_into()?;
    p.load()?;
    Ok(ebpf)
}

/// Average nanoseconds per run of `program` on `frame`, over `repeat` runs in the kernel.
fn ns_per_packet<P>(program: &P, frame: &[u8], repeat: u32) -> Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    })?;
    // The kernel reports the average duration of one run.
    Ok(result.duration.as_nanos() as f64)
}

#[derive(Clone, Copy)]
enum Hook {
    Egress,
    Ingress,
}

fn run_once(ebpf: &Ebpf, hook: Hook, frame: &[u8], repeat: u32) -> Result<f64> {
    match hook {
        Hook::Egress => {
            let p: &SchedClassifier = ebpf
                .program("resil_tc_egress")
                .context("egress")?
                .try_into()?;
            ns_per_packet(p, frame, repeat)
        }
        Hook::Ingress => {
            let p: &Xdp = ebpf
                .program("resil_xdp_ingress")
                .context("ingress")?
                .try_into()?;
            ns_per_packet(p, frame, repeat)
        }
    }
}

/// Per-packet cost on synthetic packets of each class.
pub fn synthetic(plan: &Plan) -> Result<Section> {
    let mut section = Section::new(
        "Data path: synthetic packets",
        format!(
            "Nanoseconds per packet of each program, from `BPF_PROG_TEST_RUN` with {} packets per call (the kernel's average), on a fresh load of the programs. The same frame is run again and again, so a class is measured in its steady state (a SYN after the first takes the retransmission path, data the retransmission check).",
            plan.test_run_repeat
        ),
    );
    let ebpf = load()?;
    // A tracked, established IPv4 connection for the data classes.
    run_once(
        &ebpf,
        Hook::Egress,
        &tcp_frame(CLIENT4, SERVER4, 41000, 443, 1000, 0, SYN, 0),
        1,
    )?;
    run_once(
        &ebpf,
        Hook::Ingress,
        &tcp_frame(SERVER4, CLIENT4, 443, 41000, 5000, 1001, SYN | ACK, 0),
        1,
    )?;
    run_once(
        &ebpf,
        Hook::Egress,
        &tcp_frame(CLIENT4, SERVER4, 41000, 443, 1001, 5001, ACK, 0),
        1,
    )?;
    let classes: Vec<(&str, Hook, Vec<u8>)> = vec![
        (
            "SYN out, IPv4 (TC egress)",
            Hook::Egress,
            tcp_frame(CLIENT4, SERVER4, 40000, 443, 1, 0, SYN, 0),
        ),
        (
            "SYN out, IPv6 (TC egress)",
            Hook::Egress,
            tcp_frame(CLIENT6, SERVER6, 40000, 443, 1, 0, SYN, 0),
        ),
        (
            "SYN-ACK in, IPv4 (XDP)",
            Hook::Ingress,
            tcp_frame(SERVER4, CLIENT4, 443, 40000, 7, 2, SYN | ACK, 0),
        ),
        (
            "SYN in to a local service, IPv4 (XDP)",
            Hook::Ingress,
            tcp_frame(CLIENT4, SERVER4, 40500, 8080, 9, 0, SYN, 0),
        ),
        (
            "data out, established, 1 KB (TC egress)",
            Hook::Egress,
            tcp_frame(CLIENT4, SERVER4, 41000, 443, 1001, 5001, ACK, 1000),
        ),
        (
            "data in, established, 1 KB (XDP)",
            Hook::Ingress,
            tcp_frame(SERVER4, CLIENT4, 443, 41000, 5001, 2001, ACK, 1000),
        ),
        (
            "RST in, untracked (XDP)",
            Hook::Ingress,
            tcp_frame(SERVER4, CLIENT4, 443, 42000, 1, 0, RST, 0),
        ),
        (
            "UDP, not DNS (TC egress)",
            Hook::Egress,
            udp_frame(CLIENT4, SERVER4, 5000, 5001, &[0u8; 64]),
        ),
        (
            "UDP, not DNS (XDP)",
            Hook::Ingress,
            udp_frame(SERVER4, CLIENT4, 5001, 5000, &[0u8; 64]),
        ),
    ];
    for (name, hook, frame) in classes {
        let mut samples = Vec::new();
        for _ in 0..plan.runs {
            samples.push(run_once(&ebpf, hook, &frame, plan.test_run_repeat)?);
        }
        section.add(name, "ns/packet", &samples, "");
    }
    Ok(section)
}

/// Names, run time and run count of resil's programs, from `bpftool prog show`.
pub fn program_stats() -> Result<Vec<(String, u64, u64)>> {
    let out = std::process::Command::new(super::tool("bpftool"))
        .args(["prog", "show", "--json"])
        .output()
        .context("run bpftool")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            name.starts_with("resil_").then(|| {
                (
                    name.to_string(),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                )
            })
        })
        .collect())
}

/// Turns `kernel.bpf_stats_enabled` on while alive, and back to what it was when dropped.
pub struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The value to restore if the run is interrupted while statistics are on.
static RESTORE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let before = std::fs::read_to_string(BPF_STATS).context("read bpf_stats_enabled")?;
        let before = before.trim().to_string();
        if let Ok(mut restore) = RESTORE.lock() {
            *restore = Some(before.clone());
        }
        std::fs::write(BPF_STATS, "1").context("enable bpf_stats_enabled")?;
        Ok(BpfStats(before))
    }

    /// Puts `kernel.bpf_stats_enabled` back if a run left it on (after an interruption).
    pub fn restore() {
        if let Some(value) = RESTORE.lock().ok().and_then(|mut r| r.take()) {
            let _ = std::fs::write(BPF_STATS, value);
        }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
        if let Ok(mut restore) = RESTORE.lock() {
            *restore = None;
        }
    }
}
