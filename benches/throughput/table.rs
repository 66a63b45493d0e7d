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
        "| backend | broker ceiling msg/s | worker events/s | ratio | events/s, {} entries of history | vs empty | p50 ms | p99 ms | peak RSS MiB | verify | outbound |",
        thousands(options.history as f64)
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let ratio = row.empty.events_per_second / row.ceiling.consume_per_second;
        let (history_rate, history_ratio) = match &row.history {
            Some(run) => (
                thousands(run.events_per_second),
                format!(
                    "{:.0} %",
                    100.0 * run.events_per_second / row.empty.events_per_second
                ),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let (p50, p99) = match &row.empty.latency {
            Some(latency) => (
                format!("{:.1}", latency.times.p50_ms),
                format!("{:.1}", latency.times.p99_ms),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let peak = row
            .history
            .as_ref()
            .map_or(row.empty.peak_mib, |h| h.peak_mib.max(row.empty.peak_mib));
        let verify = row.empty.verify_ok && row.history.as_ref().is_none_or(|h| h.verify_ok);
        let outbound = row.empty.outbound_ok && row.history.as_ref().is_none_or(|h| h.outbound_ok);
        println!(
            "| {} | {} | {} | {:.1} % | {} | {} | {} | {} | {:.1} | {} | {} |",
            row.backend.label(),
            thousands(row.ceiling.consume_per_second),
            thousands(row.empty.events_per_second),
            100.0 * ratio,
            history_rate,
            history_ratio,
            p50,
            p99,
            peak,
            ok(verify),
            ok(outbound)
        );
    }
    println!();
    println!("Targets (issue 5):");
    for row in rows {
        let ratio = row.empty.events_per_second / row.ceiling.consume_per_second;
        let target = row.backend.target_ratio();
        let mut lines = vec![format!(
            "throughput {:.1} % of the ceiling (target ≥ {:.0} %; the broker alone on the same path, \
             no worker: {:.1} %): {}",
            100.0 * ratio,
            100.0 * target,
            100.0 * row.ceiling.relay_per_second / row.ceiling.consume_per_second,
            met(ratio >= target)
        )];
        if let Some(history) = &row.history {
            let share = history.events_per_second / row.empty.events_per_second;
            lines.push(format!(
                "with history {:.0} % of the empty ledger (target ≥ 90 %): {}",
                100.0 * share,
                met(share >= 0.9)
            ));
        }
        if let Some(latency) = &row.empty.latency {
            let alone = row
                .ceiling
                .latency
                .as_ref()
                .map_or(String::new(), |(times, _)| {
                    format!(
                        "; the broker alone on the same path: {:.1} ms",
                        times.p99_ms
                    )
                });
            lines.push(format!(
                "p99 {:.1} ms (target ≤ 25 ms{alone}): {}",
                latency.times.p99_ms,
                met(latency.times.p99_ms <= 25.0)
            ));
        }
        let peak = row
            .history
            .as_ref()
            .map_or(row.empty.peak_mib, |h| h.peak_mib.max(row.empty.peak_mib));
        lines.push(format!(
            "peak RSS {peak:.1} MiB = {:.1} MB (target ≤ 150 MB): {}",
            peak * 1.048_576,
            met(peak * 1.048_576 <= 150.0)
        ));
        println!("  {}: {}", row.backend.label(), lines.join("; "));
    }
    println!();
    println!("Details:");
    for row in rows {
        println!(
            "  {}: broker ceiling: publish with confirms {} msg/s (CPU: {}), consume {} msg/s (CPU: {})",
            row.backend.label(),
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
