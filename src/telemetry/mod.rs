//! Metric names (one place, `convflow_<thing>_<unit>`), per-stage counters
//! the run report is built from, and logging setup.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const ITEMS_IN: &str = "convflow_stage_items_in_total";
pub const ITEMS_OUT: &str = "convflow_stage_items_out_total";
pub const ITEM_ERRORS: &str = "convflow_stage_item_errors_total";
pub const TRAIN_LOSS: &str = "convflow_trainer_loss";
pub const TRAIN_VAL_ACC: &str = "convflow_trainer_val_accuracy";

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
}

/// `RUST_LOG` picks the level (default info); `json` for machine-read logs.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.with_target(false).try_init() };
}
