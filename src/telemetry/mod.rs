//! Metric names (one place, `convflow_<thing>_<unit>`, `_total` for
//! counters), per-stage counters the run report is built from, the
//! Prometheus exporter, live progress, and logging setup.
//!
//! Every metric of a stage carries `pipeline` and `stage` labels. The
//! runtime registers the handles once per stage before any item moves and
//! then only bumps atomics per item or batch. Without an installed recorder
//! (no `metrics:` key, no report) every handle is a no-op.

pub mod exporter;
pub mod progress;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

pub use exporter::{MetricsExporter, install_prometheus};
pub use progress::ProgressMode;

// Per stage, labels {pipeline, stage}.
pub const ITEMS_IN: &str = "convflow_stage_items_in_total";
pub const ITEMS_OUT: &str = "convflow_stage_items_out_total";
/// Also labelled `reason` (a short class of the message, e.g. `cannot_decode`).
pub const ITEM_ERRORS: &str = "convflow_stage_item_errors_total";
/// Cumulative seconds; gauges because `metrics` counters hold integers
/// only. They only grow within a run: take `rate()` for a share of time.
pub const BUSY_SECONDS: &str = "convflow_stage_busy_seconds";
pub const INPUT_WAIT_SECONDS: &str = "convflow_stage_input_wait_seconds";
pub const OUTPUT_BLOCKED_SECONDS: &str = "convflow_stage_output_blocked_seconds";
/// The stage's input channel.
pub const CHANNEL_CAPACITY: &str = "convflow_channel_capacity_items";
pub const CHANNEL_FILL: &str = "convflow_channel_fill_items";
/// Of the cache a stage reads and fills.
pub const CACHE_HITS: &str = "convflow_cache_hits_total";
pub const CACHE_MISSES: &str = "convflow_cache_misses_total";
pub const CACHE_WRITES: &str = "convflow_cache_writes_total";
/// What a source will emit, when it knows up front.
pub const SOURCE_EXPECTED: &str = "convflow_source_expected_items";
/// onnx_features: one observation per model call.
pub const INFERENCE_BATCH_SECONDS: &str = "convflow_inference_batch_seconds";
/// onnx_features: 1, labelled with the `provider` in use (cpu, cuda).
pub const EXECUTION_PROVIDER: &str = "convflow_execution_provider_info";
/// dense_head, set after every epoch.
pub const TRAIN_LOSS: &str = "convflow_trainer_loss";
pub const TRAIN_VAL_ACC: &str = "convflow_trainer_val_accuracy";

/// Histogram buckets of [`INFERENCE_BATCH_SECONDS`].
pub const INFERENCE_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// HELP text of every metric (promtool wants one for each).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(ITEMS_IN, Unit::Count, "Items (images) a stage took from its input.");
    describe_counter!(ITEMS_OUT, Unit::Count, "Items (images) a stage emitted.");
    describe_counter!(
        ITEM_ERRORS,
        Unit::Count,
        "Items a stage could not process, by reason (skipped, or fatal under on_error: fail)."
    );
    describe_gauge!(
        BUSY_SECONDS,
        Unit::Seconds,
        "Cumulative seconds a stage spent working (summed over workers); only grows."
    );
    describe_gauge!(INPUT_WAIT_SECONDS, Unit::Seconds, "Cumulative seconds a stage waited for input; only grows.");
    describe_gauge!(
        OUTPUT_BLOCKED_SECONDS,
        Unit::Seconds,
        "Cumulative seconds a stage was blocked on a full output channel; only grows."
    );
    describe_gauge!(CHANNEL_CAPACITY, Unit::Count, "Capacity of a stage's input channel, in items.");
    describe_gauge!(CHANNEL_FILL, Unit::Count, "Items waiting in a stage's input channel.");
    describe_counter!(CACHE_HITS, Unit::Count, "Feature cache lookups that found the features.");
    describe_counter!(CACHE_MISSES, Unit::Count, "Feature cache lookups that did not.");
    describe_counter!(CACHE_WRITES, Unit::Count, "Feature maps written to the cache.");
    describe_gauge!(SOURCE_EXPECTED, Unit::Count, "Items a source will emit, known up front.");
    describe_histogram!(
        INFERENCE_BATCH_SECONDS,
        Unit::Seconds,
        "Seconds of one model call on a batch (cache hits excluded)."
    );
    describe_gauge!(EXECUTION_PROVIDER, "1 for the execution provider a model runs on (label provider).");
    describe_gauge!(TRAIN_LOSS, "Training loss of the dense head after the last epoch.");
    describe_gauge!(TRAIN_VAL_ACC, "Validation accuracy of the dense head after the last epoch.");
}

/// `pipeline` and `stage` labels, or nothing at all when metrics are off.
#[derive(Debug, Clone)]
pub struct StageLabels(Option<[(&'static str, String); 2]>);

impl StageLabels {
    pub fn new(pipeline: &str, stage: &str, enabled: bool) -> Self {
        StageLabels(enabled.then(|| [("pipeline", pipeline.to_string()), ("stage", stage.to_string())]))
    }
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }
    pub fn counter(&self, name: &'static str) -> Counter {
        match &self.0 {
            Some(l) => metrics::counter!(name, l),
            None => Counter::noop(),
        }
    }
    pub fn gauge(&self, name: &'static str) -> Gauge {
        match &self.0 {
            Some(l) => metrics::gauge!(name, l),
            None => Gauge::noop(),
        }
    }
    pub fn histogram(&self, name: &'static str) -> Histogram {
        match &self.0 {
            Some(l) => metrics::histogram!(name, l),
            None => Histogram::noop(),
        }
    }
    /// With one more label (e.g. `reason`, `provider`); registry look-up, so not per item.
    pub fn counter_with(&self, name: &'static str, key: &'static str, value: &str) -> Counter {
        match &self.0 {
            Some([a, b]) => metrics::counter!(name, &[a.clone(), b.clone(), (key, value.to_string())]),
            None => Counter::noop(),
        }
    }
    pub fn gauge_with(&self, name: &'static str, key: &'static str, value: &str) -> Gauge {
        match &self.0 {
            Some([a, b]) => metrics::gauge!(name, &[a.clone(), b.clone(), (key, value.to_string())]),
            None => Gauge::noop(),
        }
    }
}

impl crate::stage::BuildContext<'_> {
    /// This stage's labels, for a stage that records its own metrics.
    pub fn metric_labels(&self) -> StageLabels {
        StageLabels::new(self.pipeline, self.stage_id, self.metrics)
    }
}

/// A bounded label for an error message: its leading words without
/// numbers, paths or punctuation (`cannot decode: ...` -> `cannot_decode`).
pub fn reason_class(reason: &str) -> String {
    let head = reason.split([':', '(', ';', ',']).next().unwrap_or_default();
    let words: Vec<String> = head
        .split_whitespace()
        .filter(|w| w.chars().all(|c| c.is_ascii_alphabetic() || c == '_' || c == '-'))
        .take(5)
        .map(|w| w.to_ascii_lowercase().replace('-', "_"))
        .collect();
    if words.is_empty() { "other".to_string() } else { words.join("_") }
}

/// Distinct `reason` labels one stage may create; the rest count as `other`.
const MAX_REASONS: usize = 16;

/// Counted by the runtime around every stage call: cheap atomics, read
/// once at the end for the report.
#[derive(Debug, Default)]
pub struct StageStats {
    pub items_in: AtomicU64,
    pub items_out: AtomicU64,
    pub item_errors: AtomicU64,
    busy_ns: AtomicU64,
    wait_ns: AtomicU64,
    blocked_ns: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
}

fn add(counter: &AtomicU64, d: Duration) {
    counter.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
}

fn secs(counter: &AtomicU64) -> f64 {
    counter.load(Ordering::Relaxed) as f64 / 1e9
}

impl StageStats {
    pub fn add_busy(&self, d: Duration) {
        add(&self.busy_ns, d)
    }
    pub fn add_wait(&self, d: Duration) {
        add(&self.wait_ns, d)
    }
    pub fn add_blocked(&self, d: Duration) {
        add(&self.blocked_ns, d)
    }
    pub fn busy_seconds(&self) -> f64 {
        secs(&self.busy_ns)
    }
    pub fn wait_seconds(&self) -> f64 {
        secs(&self.wait_ns)
    }
    pub fn blocked_seconds(&self) -> f64 {
        secs(&self.blocked_ns)
    }
    pub fn blocked_nanos(&self) -> u64 {
        self.blocked_ns.load(Ordering::Relaxed)
    }
    /// Counts one item error; returns its reason class (bounded per stage).
    pub fn add_error(&self, reason: &str) -> String {
        self.item_errors.fetch_add(1, Ordering::Relaxed);
        let mut class = reason_class(reason);
        if let Ok(mut r) = self.reasons.lock() {
            if !r.contains_key(&class) && r.len() >= MAX_REASONS {
                class = "other".to_string();
            }
            *r.entry(class.clone()).or_default() += 1;
        }
        class
    }
    /// Item errors by reason class.
    pub fn errors_by_reason(&self) -> BTreeMap<String, u64> {
        self.reasons.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// `RUST_LOG` picks the level (default info); `json` for machine-read logs.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.with_target(false).try_init() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_classes_are_short_and_bounded() {
        assert_eq!(reason_class("cannot decode: Format error decoding Jpeg"), "cannot_decode");
        assert_eq!(reason_class("4000x3000 is over max_pixels (1000)"), "is_over_max_pixels");
        assert_eq!(reason_class("cannot read: No such file or directory (os error 2)"), "cannot_read");
        assert_eq!(reason_class("empty file"), "empty_file");
        assert_eq!(reason_class("/x/y.jpg"), "other");
        let s = StageStats::default();
        for i in 0..40 {
            s.add_error(&format!(
                "{} failed",
                "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz".get(i..i + 3).unwrap_or("zz")
            ));
        }
        assert!(s.errors_by_reason().len() <= MAX_REASONS + 1);
        assert_eq!(s.errors_by_reason().values().sum::<u64>(), 40);
        assert_eq!(s.item_errors.load(Ordering::Relaxed), 40);
    }
}
