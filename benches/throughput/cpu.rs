//! Where the CPU went: readings of `/proc` before and after a step.

use std::collections::{BTreeMap, HashMap};

/// A process as `/proc/PID/stat` shows it (or a thread: `PID/task/TID`):
/// its name, its start (clock ticks after boot, which with the pid tells one
/// process from a later one with the same pid) and the CPU time (user +
/// system) it has used so far, in seconds: unlike wall time, barely moved by
/// whatever else the machine is doing.
pub fn process_stat(pid: &str) -> Option<(String, u64, f64)> {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    // Fields after the command name, which is in parentheses: utime, stime
    // and starttime are the 14th, 15th and 22nd fields of the line.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    let start: u64 = fields.get(19)?.parse().ok()?;
    Some((name, start, (user + system) / ticks_per_second))
}

/// The CPU time of every process, by (pid, start), with whom it counts for,
/// and the machine's idle and total ticks, read from `/proc` at one instant.
/// Two readings give where the cores went between them.
#[derive(Default)]
pub struct CpuReading {
    pub processes: HashMap<(String, u64), (&'static str, f64)>,
    /// The worker's threads, by (tid, start), with their names.
    pub worker_threads: HashMap<(String, u64), (String, f64)>,
    pub idle_ticks: f64,
    pub total_ticks: f64,
}

impl CpuReading {
    pub fn take(worker: u32) -> Self {
        let mut reading = Self::default();
        let worker = worker.to_string();
        let bench = std::process::id().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Some((name, start, seconds)) = process_stat(&pid) else {
                continue;
            };
            let who = if pid == worker {
                "worker"
            } else if pid == bench {
                "bench"
            } else if name == "beam.smp" || name.starts_with("erl_child") || name == "epmd" {
                "broker"
            } else if name == "postgres" {
                "PostgreSQL"
            } else {
                "other"
            };
            reading.processes.insert((pid, start), (who, seconds));
        }
        let tasks = std::fs::read_dir(format!("/proc/{worker}/task"));
        for entry in tasks.into_iter().flatten().flatten() {
            let tid = entry.file_name().to_string_lossy().into_owned();
            if let Some((name, start, seconds)) = process_stat(&format!("{worker}/task/{tid}")) {
                reading.worker_threads.insert((tid, start), (name, seconds));
            }
        }
        // The "cpu" line of /proc/stat: ticks of every kind summed over the
        // machine's CPUs; the fourth and fifth are idle and iowait.
        let ticks: Vec<f64> = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| stat.lines().next().map(str::to_owned))
            .map(|line| {
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|t| t.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        reading.idle_ticks = ticks.iter().skip(3).take(2).sum();
        reading.total_ticks = ticks.iter().sum();
        reading
    }

    /// Where the CPU went between `self` (earlier) and `later`, process by
    /// process: one that started in between counts in full, one that ended
    /// in between is missed (short-lived ones only: the worker, the broker
    /// and the database's connections live through a step).
    pub fn until(&self, later: &Self) -> CpuSplit {
        let total = later.total_ticks - self.total_ticks;
        CpuSplit {
            seconds: used_between(&self.processes, &later.processes),
            worker_threads: used_between(&self.worker_threads, &later.worker_threads),
            idle_share: if total > 0.0 {
                (later.idle_ticks - self.idle_ticks) / total
            } else {
                0.0
            },
        }
    }
}

/// The CPU seconds used between two readings of processes or threads
/// (`before`, `after`: CPU seconds so far and whom they count for, by id and
/// start), summed by whom they count for.
fn used_between<K: Eq + std::hash::Hash, W: Ord + Clone>(
    before: &HashMap<K, (W, f64)>,
    after: &HashMap<K, (W, f64)>,
) -> BTreeMap<W, f64> {
    let mut seconds = BTreeMap::new();
    for (id, (who, used)) in after {
        let earlier = before.get(id).map_or(0.0, |(_, used)| *used);
        *seconds.entry(who.clone()).or_default() += used - earlier;
    }
    seconds
}

/// Where the machine's CPU went during a step: CPU seconds by who used them
/// (the worker, the broker, PostgreSQL, the bench, everything else) and the
/// share of the machine's CPU time left idle, which shows how much of the
/// cores the worker could have had.
#[derive(Default)]
pub struct CpuSplit {
    pub seconds: BTreeMap<&'static str, f64>,
    /// The worker's CPU seconds by thread name (threads that ended within
    /// the step are missed): SQLite's own threads apart from the rest.
    pub worker_threads: BTreeMap<String, f64>,
    pub idle_share: f64,
}

impl CpuSplit {
    pub const WHO: [&'static str; 5] = ["worker", "broker", "PostgreSQL", "bench", "other"];

    pub fn worker(&self) -> f64 {
        self.seconds.get("worker").copied().unwrap_or(0.0)
    }

    /// "worker 150, broker 80, … µs per message; cores idle 3 %".
    pub fn per_message(&self, messages: f64) -> String {
        let used: Vec<String> = Self::WHO
            .iter()
            .map(|who| {
                let seconds = self.seconds.get(who).copied().unwrap_or(0.0);
                format!("{who} {:.0}", seconds * 1e6 / messages)
            })
            .collect();
        let mut threads: Vec<(&String, &f64)> = self.worker_threads.iter().collect();
        threads.sort_by(|a, b| b.1.total_cmp(a.1));
        let threads: Vec<String> = threads
            .into_iter()
            .filter(|(_, seconds)| **seconds > 0.0)
            .map(|(name, seconds)| format!("{name} {:.0}", seconds * 1e6 / messages))
            .collect();
        let threads = if threads.is_empty() {
            String::new()
        } else {
            format!(" (the worker's threads: {})", threads.join(", "))
        };
        format!(
            "{} µs per message{threads}; cores idle {:.0} %",
            used.join(", "),
            100.0 * self.idle_share
        )
    }
}
