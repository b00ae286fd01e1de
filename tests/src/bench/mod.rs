//! The benchmark harness behind `cargo xtask bench`: every figure is measured several times in
//! one run and reported as its median with the spread (min–max); comparisons are ratios taken
//! within the same run, so a busy machine's noise falls on both sides.

pub mod datapath;
pub mod failover;
pub mod traffic;

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;
use serde_json::{json, Value};

/// How long and how often to measure.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Repetitions of each figure.
    pub runs: usize,
    /// Length of one traffic run.
    pub traffic: Duration,
    /// Packets per `BPF_PROG_TEST_RUN` call.
    pub test_run_repeat: u32,
    /// Connections per fast-fail run.
    pub fast_fail_connects: usize,
}

impl Plan {
    /// A full run (a few minutes).
    pub const FULL: Plan = Plan {
        runs: 5,
        traffic: Duration::from_secs(5),
        test_run_repeat: 1_000_000,
        fast_fail_connects: 2_000,
    };
    /// `--quick`: the same figures, shorter and fewer.
    pub const QUICK: Plan = Plan {
        runs: 3,
        traffic: Duration::from_secs(2),
        test_run_repeat: 100_000,
        fast_fail_connects: 300,
    };
}

/// A figure measured `n` times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    /// The median and spread of `samples` (`None` when there are none).
    pub fn of(samples: &[f64]) -> Option<Stat> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Stat {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            n: sorted.len(),
        })
    }
}

/// The path of a system tool: on the `PATH`, or in /usr/sbin or /sbin (where Debian puts
/// bpftool and haproxy, and which a user's `PATH` may lack).
pub fn tool(name: &str) -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| name.into())
}

/// The `q` quantile of sorted samples (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One line of a section.
#[derive(Debug, Clone)]
pub struct Row {
    pub figure: String,
    pub unit: &'static str,
    pub stat: Option<Stat>,
    pub note: String,
}

/// A part of the report.
#[derive(Debug, Clone)]
pub struct Section {
    pub title: &'static str,
    pub about: String,
    pub rows: Vec<Row>,
}

impl Section {
    pub fn new(title: &'static str, about: impl Into<String>) -> Self {
        Section {
            title,
            about: about.into(),
            rows: Vec::new(),
        }
    }

    /// Adds a figure from its samples.
    pub fn add(
        &mut self,
        figure: impl Into<String>,
        unit: &'static str,
        samples: &[f64],
        note: impl Into<String>,
    ) {
        self.rows.push(Row {
            figure: figure.into(),
            unit,
            stat: Stat::of(samples),
            note: note.into(),
        });
    }

    /// Records that a figure could not be measured, and why.
    pub fn skip(&mut self, figure: impl Into<String>, why: impl std::fmt::Display) {
        self.rows.push(Row {
            figure: figure.into(),
            unit: "",
            stat: None,
            note: format!("not measured: {why}"),
        });
    }
}

fn number(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The machine the run was on, in a line.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// Writes `report.md` and `report.json` into `dir`.
pub fn write(dir: &Path, plan: &Plan, quick: bool, sections: &[Section]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let machine = machine();
    let mut md = String::new();
    let _ = writeln!(md, "# resil benchmark report\n");
    let _ = writeln!(
        md,
        "Machine: {machine}. Mode: {} ({} runs per figure). Each figure is the median of its runs, with the spread (min – max).\n",
        if quick { "quick" } else { "full" },
        plan.runs
    );
    let mut json_sections = Vec::new();
    for section in sections {
        let _ = writeln!(md, "## {}\n\n{}\n", section.title, section.about);
        let _ = writeln!(md, "| figure | median | spread | unit | runs | note |");
        let _ = writeln!(md, "|---|---:|---:|---|---:|---|");
        let mut rows = Vec::new();
        for row in &section.rows {
            match row.stat {
                Some(s) => {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} – {} | {} | {} | {} |",
                        row.figure,
                        number(s.median),
                        number(s.min),
                        number(s.max),
                        row.unit,
                        s.n,
                        row.note
                    );
                    rows.push(json!({
                        "figure": row.figure, "unit": row.unit, "median": s.median,
                        "min": s.min, "max": s.max, "runs": s.n, "note": row.note,
                    }));
                }
                None => {
                    let _ = writeln!(
                        md,
                        "| {} | – | – | {} | 0 | {} |",
                        row.figure, row.unit, row.note
                    );
                    rows.push(json!({"figure": row.figure, "unit": row.unit, "median": Value::Null, "note": row.note}));
                }
            }
        }
        md.push('\n');
        json_sections.push(json!({"title": section.title, "about": section.about, "rows": rows}));
    }
    std::fs::write(dir.join("report.md"), md)?;
    let report = json!({
        "machine": machine,
        "quick": quick,
        "runs": plan.runs,
        "sections": json_sections,
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_median_and_the_spread() {
        let s = Stat::of(&[3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stat::of(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(Stat::of(&[]).is_none());
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.5), 3.0);
    }
}
