//! What the benchmarks read from `/proc`: the machine, a process's memory, and where the CPU
//! time of a phase went (per process group: memos, PostgreSQL, Kafka, Redis, the rest).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Serialize;

/// Clock ticks per second of `/proc/*/stat` times (`getconf CLK_TCK`; 100 on every Linux
/// architecture memOS targets).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gb: f64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let memory_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| status_kb(&m, "MemTotal:"))
        .unwrap_or(0);
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        kernel,
        memory_gb: round(memory_kb as f64 / 1024.0 / 1024.0, 1),
    }
}

fn status_kb(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l[field.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident set size and its peak (`VmRSS`, `VmHWM`) of a process, in KiB.
pub fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((status_kb(&status, "VmRSS:")?, status_kb(&status, "VmHWM:")?))
}

/// Rounds to `digits` decimals, for readable JSON.
pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// CPU time of every process, and of the whole machine, at one instant.
pub struct CpuSnapshot {
    at: Instant,
    /// pid -> (group, cpu seconds)
    processes: HashMap<u32, (String, f64)>,
    /// (busy, total) seconds of all cores, from `/proc/stat`.
    machine: (f64, f64),
}

/// Where the CPU time between two snapshots went.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUsage {
    pub wall_seconds: f64,
    /// CPU seconds per process group. `unattributed`: busy time of the machine that no
    /// process still alive at the end accounts for (processes that exited in between, such as
    /// compilers of a concurrent build, and kernel work); a large value means the phase
    /// shared the machine.
    pub seconds: BTreeMap<String, f64>,
    /// Share of all cores busy (user, system, irq, steal) over the interval.
    pub machine_busy: f64,
}

/// Takes a snapshot; `named` gives a group name to specific pids (the processes under test).
pub fn cpu_snapshot(named: &[(u32, &str)]) -> CpuSnapshot {
    let mut processes = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // After the comm: state is field 0, utime 11, stime 12.
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let seconds = (ticks(11) + ticks(12)) / TICKS_PER_SECOND;
            let group = match named.iter().find(|(p, _)| *p == pid) {
                Some((_, name)) => (*name).to_owned(),
                None => classify(pid, comm),
            };
            processes.insert(pid, (group, seconds));
        }
    }
    CpuSnapshot {
        at: Instant::now(),
        processes,
        machine: machine_ticks(),
    }
}

fn classify(pid: u32, comm: &str) -> String {
    match comm {
        "postgres" => "postgres".into(),
        "redis-server" => "redis".into(),
        "memos" => "memos".into(),
        "memosctl" => "memosctl".into(),
        "java" => {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("kafka.Kafka") {
                "kafka".into()
            } else {
                "other".into()
            }
        }
        _ => "other".into(),
    }
}

fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let get = |i: usize| values.get(i).copied().unwrap_or(0.0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let total = busy + get(3) + get(4);
    (busy / TICKS_PER_SECOND, total / TICKS_PER_SECOND)
}

impl CpuSnapshot {
    /// CPU time used since `self`, up to `later`.
    pub fn usage_until(&self, later: &CpuSnapshot) -> CpuUsage {
        let mut seconds: BTreeMap<String, f64> = BTreeMap::new();
        for (pid, (group, after)) in &later.processes {
            let before = self.processes.get(pid).map_or(0.0, |(_, s)| *s);
            let delta = (after - before).max(0.0);
            *seconds.entry(group.clone()).or_default() += delta;
        }
        let busy = later.machine.0 - self.machine.0;
        let total = later.machine.1 - self.machine.1;
        let attributed: f64 = seconds.values().sum();
        seconds.insert("unattributed".into(), (busy - attributed).max(0.0));
        for value in seconds.values_mut() {
            *value = round(*value, 2);
        }
        CpuUsage {
            wall_seconds: round(later.at.duration_since(self.at).as_secs_f64(), 3),
            seconds,
            machine_busy: if total > 0.0 { round(busy / total, 3) } else { 0.0 },
        }
    }
}

/// The `q` quantile (0..=1) of sorted values, nearest rank; 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
