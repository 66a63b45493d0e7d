//! The output: one table with every figure and target.

use crate::*;

pub fn ok(flag: bool) -> &'static str {
    if flag { "ok" } else { "FAILED" }
}

pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_owned();
    }
    let digits = format!("{:.0}", value.round());
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

pub fn print_table(rows: &[Row], options: &Options, workload: &Workload) {
    println!();
    println!(
        "Throughput, {} inbound events ({} valid: {} duplicates, {} malformed), {} pre-existing accounts \
         + {} opened; history {} journal entries; latency at {}/s for {} s",
        thousands(workload.messages.len() as f64),
        thousands(workload.expected.len() as f64),
        workload.duplicates,
        workload.malformed,
        thousands(options.accounts as f64),
        workload
            .inbound_types
            .get("credits.account.opened")
            .copied()
            .unwrap_or(0),
        thousands(options.history as f64),
        thousands(f64::from(options.rate)),
        options.latency_seconds
    );
    println!();
    println!(
        "Medians of {} run(s) per backend; the relay is the broker alone on the worker's path, \
         in the same run; CPU is per inbound event",
        options.runs
    );
    println!();
    let history = format!(
        "events/s, {} entries of history",
        thousands(options.history as f64)
    );
    header(&["backend"], &history);
    let mut medians = Vec::new();
    for backend in &options.backends {
        let runs: Vec<Figures> = rows
            .iter()
            .filter(|row| row.backend == *backend)
            .map(|row| Figures::of(row, workload))
            .collect();
        if runs.is_empty() {
            continue;
        }
        let median = Figures::median(&runs);
        println!("{}", median.line(backend.label()));
        medians.push((*backend, median));
    }
    println!();
    println!("The runs:");
    println!();
    header(&["run", "backend"], &history);
    for row in rows {
        println!(
            "| {} {}",
            row.run,
            Figures::of(row, workload).line(row.backend.label())
        );
    }
    println!();
    println!("Targets (issue 22), on the medians:");
    for (backend, median) in &medians {
        println!(
            "  {}: {}",
            backend.label(),
            median.targets(*backend).join("; ")
        );
    }
    println!();
    println!("Details:");
    for row in rows {
        println!(
            "  {}, run {}: broker ceiling: publish with confirms {} msg/s (CPU: {}), consume {} msg/s (CPU: {})",
            row.backend.label(),
            row.run,
            thousands(row.ceiling.publish_per_second),
            row.ceiling
                .publish_cpu
                .per_message(workload.messages.len() as f64),
            thousands(row.ceiling.consume_per_second),
            row.ceiling
                .consume_cpu
                .per_message(workload.messages.len() as f64)
        );
        println!(
            "    the broker alone on the worker's path (the workload through a relay in the bench \
             instead of the worker): {} msg/s, {:.1} % of the ceiling (CPU: {})",
            thousands(row.ceiling.relay_per_second),
            100.0 * row.ceiling.relay_per_second / row.ceiling.consume_per_second,
            row.ceiling
                .relay_cpu
                .per_message(workload.messages.len() as f64)
        );
        if let Some((times, cpu)) = &row.ceiling.latency {
            println!(
                "    the broker alone on the worker's path at the latency step's rate \
                 (a relay in the bench instead of the worker): {} over {} messages; CPU: {}",
                times,
                thousands(times.measured as f64),
                cpu.per_message(times.measured as f64)
            );
        }
        let mut runs = vec![("empty ledger", &row.empty)];
        if let Some(history) = &row.history {
            runs.push(("with history", history));
        }
        for (name, run) in runs {
            let m = &run.metrics;
            let mean_batch = if m.batch_count > 0.0 {
                m.batch_sum / m.batch_count
            } else {
                0.0
            };
            // /metrics is polled every 0.25 s: a run whose last batch was
            // applied within the last poll before the end has no figure.
            let applied = match run.applied_at {
                Some(at) => format!(
                    "all applied by {at:.1} s, when the outbox backlog was {:?}",
                    run.backlog_when_applied
                ),
                None => "all applied within 0.25 s of the end".to_owned(),
            };
            println!(
                "    {name}: {:.1} s ({} events/s), startup {:.2} s; worker CPU {:.1} s; CPU: {}; {applied}; \
                 last outbound event at {:.1} s; whole outbox (emails too) sent at {}",
                run.seconds,
                thousands(run.events_per_second),
                run.startup_seconds,
                run.cpu.worker(),
                run.cpu.per_message(workload.messages.len() as f64),
                run.outbound_at,
                run.drained_at
                    .map_or("-".to_owned(), |s| format!("{s:.1} s"))
            );
            println!(
                "      {} batches, mean {:.1} messages (1: {:.0} %, ≤ 10: {:.0} %, ≤ 100: {:.0} %, ≤ 250: {:.0} %); \
                 apply+commit {:.1} s in all ({:.2} ms per batch, {:.0} % of the run); emails sent {}; outcomes {:?}; peak RSS {:.1} MiB",
                thousands(m.batch_count),
                mean_batch,
                100.0 * m.batches_up_to(1.0),
                100.0 * m.batches_up_to(10.0),
                100.0 * m.batches_up_to(100.0),
                100.0 * m.batches_up_to(250.0),
                m.apply_sum,
                if m.batch_count > 0.0 {
                    1000.0 * m.apply_sum / m.batch_count
                } else {
                    0.0
                },
                100.0 * m.apply_sum / run.seconds,
                thousands(m.emails_sent),
                m.outcomes,
                run.peak_mib
            );
            if let Some(latency) = &run.latency {
                println!(
                    "      latency: {} events at {:.0}/s achieved: {}; \
                     {} batches of {:.1} messages on average, {:.1} ms apply+commit each; outbox backlog after the last publish {:?}; CPU: {}",
                    thousands(latency.times.measured as f64),
                    latency.achieved_rate,
                    latency.times,
                    thousands(latency.batches),
                    latency.mean_batch,
                    latency.apply_ms_per_batch,
                    latency.backlog_after_publishing,
                    latency.cpu.per_message(latency.times.measured as f64)
                );
            }
            for note in &run.notes {
                println!("      {note}");
            }
            for problem in &run.problems {
                println!("      WARNING: {problem}");
            }
        }
        if row.history.is_some() {
            println!("    history fill (not timed): {:.1} s", row.fill_seconds);
        }
    }
}

/// The header of a table of [`Figures`]: `first` columns, then the figures'.
fn header(first: &[&str], history: &str) {
    let columns: Vec<&str> = first
        .iter()
        .copied()
        .chain([
            "relay msg/s",
            "worker events/s",
            "of the relay",
            "worker CPU µs",
            "PostgreSQL CPU µs",
            history,
            "vs empty",
            "p99 ms",
            "relay p99 ms",
            "peak RSS MiB",
            "verify",
            "outbound",
        ])
        .collect();
    println!("| {} |", columns.join(" | "));
    println!("|{}", "---|".repeat(columns.len()));
}

pub fn met(flag: bool) -> &'static str {
    if flag { "met" } else { "MISSED" }
}

pub fn print_api_table(rows: &[ApiRow], options: &Options) {
    let Some(first) = rows.first() else {
        return;
    };
    println!();
    println!(
        "Read API, {} journal entries over {} accounts; {} samples of each GET, one at a time \
         (p50 / p99 ms; pages of 100 unless said; a deep page comes after {} rows of its account)",
        thousands(options.history as f64),
        options.api_accounts,
        options.api_samples,
        thousands(first.depth as f64)
    );
    println!();
    let backends: Vec<&str> = rows.iter().map(|row| row.backend.label()).collect();
    println!("| GET | {} |", backends.join(" | "));
    println!("|---|{}", "---|".repeat(rows.len()));
    for (n, (name, _)) in first.gets.iter().enumerate() {
        let cells: Vec<String> = rows
            .iter()
            .map(|row| {
                let times = &row.gets[n].1;
                format!("{:.1} / {:.1}", times.p50_ms, times.p99_ms)
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let fills: Vec<String> = rows
        .iter()
        .map(|row| format!("{} {:.0} s", row.backend.label(), row.fill_seconds))
        .collect();
    println!();
    println!("Ledger fill (not timed above): {}.", fills.join(", "));
}

/// The figures of one run that issue 22's targets are about.
pub struct Figures {
    relay: f64,
    events: f64,
    /// CPU seconds per inbound event, in µs: the worker's and PostgreSQL's
    /// (none on SQLite).
    worker_micros: f64,
    server_micros: Option<f64>,
    history_events: Option<f64>,
    p99_ms: Option<f64>,
    relay_p99_ms: Option<f64>,
    peak_mib: f64,
    verify: bool,
    outbound: bool,
}

impl Figures {
    pub fn of(row: &Row, workload: &Workload) -> Figures {
        let messages = workload.messages.len() as f64;
        let per_event =
            |who: &str| row.empty.cpu.seconds.get(who).copied().unwrap_or(0.0) * 1e6 / messages;
        let runs = || std::iter::once(&row.empty).chain(row.history.as_ref());
        Figures {
            relay: row.ceiling.relay_per_second,
            events: row.empty.events_per_second,
            worker_micros: per_event("worker"),
            server_micros: (row.backend == Backend::Postgres).then(|| per_event("PostgreSQL")),
            history_events: row.history.as_ref().map(|run| run.events_per_second),
            p99_ms: row
                .empty
                .latency
                .as_ref()
                .map(|latency| latency.times.p99_ms),
            relay_p99_ms: row.ceiling.latency.as_ref().map(|(times, _)| times.p99_ms),
            peak_mib: runs().map(|run| run.peak_mib).fold(0.0, f64::max),
            verify: runs().all(|run| run.verify_ok),
            outbound: runs().all(|run| run.outbound_ok),
        }
    }

    /// Each figure's median over `runs` (the mean of the middle two for an
    /// even count); verify and outbound hold only if they held in every run.
    pub fn median(runs: &[Figures]) -> Figures {
        let of = |figure: fn(&Figures) -> f64| median(runs.iter().map(figure).collect());
        let some = |figure: fn(&Figures) -> Option<f64>| {
            let values: Vec<f64> = runs.iter().filter_map(figure).collect();
            (!values.is_empty()).then(|| median(values))
        };
        Figures {
            relay: of(|f| f.relay),
            events: of(|f| f.events),
            worker_micros: of(|f| f.worker_micros),
            server_micros: some(|f| f.server_micros),
            history_events: some(|f| f.history_events),
            p99_ms: some(|f| f.p99_ms),
            relay_p99_ms: some(|f| f.relay_p99_ms),
            peak_mib: of(|f| f.peak_mib),
            verify: runs.iter().all(|f| f.verify),
            outbound: runs.iter().all(|f| f.outbound),
        }
    }

    fn relay_share(&self) -> f64 {
        self.events / self.relay
    }

    fn history_share(&self) -> Option<f64> {
        self.history_events.map(|events| events / self.events)
    }

    /// The table's cells after the run's number, from the backend on.
    fn line(&self, backend: &str) -> String {
        let cell =
            |value: Option<f64>, format: fn(f64) -> String| value.map_or("-".to_owned(), format);
        format!(
            "| {backend} | {} | {} | {:.1} % | {:.0} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            thousands(self.relay),
            thousands(self.events),
            100.0 * self.relay_share(),
            self.worker_micros,
            cell(self.server_micros, |v| format!("{v:.0}")),
            cell(self.history_events, thousands),
            cell(self.history_share(), |v| format!("{:.0} %", 100.0 * v)),
            cell(self.p99_ms, |v| format!("{v:.1}")),
            cell(self.relay_p99_ms, |v| format!("{v:.1}")),
            self.peak_mib,
            ok(self.verify),
            ok(self.outbound),
        )
    }

    /// Issue 22's targets, each with its figure and whether it was met.
    fn targets(&self, backend: Backend) -> Vec<String> {
        let share = self.relay_share();
        let mut lines = vec![
            format!(
                "throughput {:.1} % of the relay (target ≥ {:.0} %): {}",
                100.0 * share,
                100.0 * backend.target_relay_ratio(),
                met(share >= backend.target_relay_ratio())
            ),
            format!(
                "worker CPU {:.0} µs per event (target ≤ {:.0}): {}",
                self.worker_micros,
                backend.target_worker_micros(),
                met(self.worker_micros <= backend.target_worker_micros())
            ),
        ];
        if let Some(server) = self.server_micros {
            lines.push(format!(
                "PostgreSQL CPU {server:.0} µs per event (target ≤ {TARGET_SERVER_MICROS:.0}): {}",
                met(server <= TARGET_SERVER_MICROS)
            ));
        }
        if let (Some(p99), Some(relay)) = (self.p99_ms, self.relay_p99_ms) {
            lines.push(format!(
                "p99 {p99:.1} ms (target ≤ the relay's {relay:.1} + {TARGET_P99_OVER_RELAY_MS:.0} ms): {}",
                met(p99 <= relay + TARGET_P99_OVER_RELAY_MS)
            ));
        }
        if let Some(history) = self.history_share() {
            lines.push(format!(
                "with history {:.0} % of the empty ledger (target ≥ 90 %): {}",
                100.0 * history,
                met(history >= 0.9)
            ));
        }
        lines.push(format!(
            "peak RSS {:.1} MiB = {:.1} MB (target ≤ 150 MB): {}",
            self.peak_mib,
            self.peak_mib * 1.048_576,
            met(self.peak_mib * 1.048_576 <= 150.0)
        ));
        lines
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}
