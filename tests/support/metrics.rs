//! The worker's `/metrics` (Prometheus text) read back as samples, for the
//! tests that count what a worker did and for the throughput bench.
#![allow(dead_code)]

use prometheus_parse::{Sample, Scrape, Value};

/// Every sample of `text`; a histogram's buckets come as one sample named
/// after the histogram, its `_sum` and `_count` as samples of their own.
pub fn samples(text: &str) -> Vec<Sample> {
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))
        .expect("reading from a string does not fail")
        .samples
}

/// The value of a counter, gauge or untyped sample (`None` for a histogram
/// or a summary).
pub fn value(sample: &Sample) -> Option<f64> {
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
        Value::Histogram(_) | Value::Summary(_) => None,
    }
}

/// The samples of `metric` with their values.
pub fn series<'a>(
    samples: &'a [Sample],
    metric: &'a str,
) -> impl Iterator<Item = (&'a Sample, f64)> {
    samples
        .iter()
        .filter(move |sample| sample.metric == metric)
        .filter_map(|sample| Some((sample, value(sample)?)))
}
