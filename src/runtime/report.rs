//! The run report: per-stage counts and time shares, skipped items, cache
//! hits, and which stage held the pipeline back.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::Shared;
use crate::cache::CacheHandle;
use crate::graph::Graph;
use crate::telemetry::StageStats;

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub stage: String,
    /// Written escaped ([`crate::names`]), so any name fits the report.
    #[serde(serialize_with = "crate::names::serialize_path")]
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    pub workers: usize,
    pub items_in: u64,
    pub items_out: u64,
    pub item_errors: u64,
    /// Item errors by reason class (the `reason` label of the metric).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub errors_by_reason: BTreeMap<String, u64>,
    pub items_per_second: f64,
    /// Share of wall time spent working, per worker.
    pub busy_pct: f64,
    pub waiting_for_input_pct: f64,
    pub blocked_on_output_pct: f64,
    /// The seconds behind the three shares (busy summed over workers), as
    /// the `convflow_stage_*_seconds` metrics hold them.
    pub busy_seconds: f64,
    pub waiting_for_input_seconds: f64,
    pub blocked_on_output_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    pub hits: u64,
    pub misses: u64,
    pub writes: u64,
    pub hit_pct: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<crate::cache::shared::SharedReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub wall_seconds: f64,
    /// Part of the wall time spent before the first item moved: opening
    /// caches, loading models.
    pub setup_seconds: f64,
    pub interrupted: bool,
    pub stages: Vec<StageReport>,
    pub cache: Option<CacheReport>,
    pub skipped: Vec<Skipped>,
    pub bottleneck: Option<String>,
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { (1000.0 * part / whole).round() / 10.0 } else { 0.0 }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One CSV field, quoted when it must be (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

pub(super) fn build(
    graph: &Graph,
    stats: &[Arc<StageStats>],
    shared: &Shared,
    caches: &HashMap<usize, CacheHandle>,
    wall: Duration,
    setup: Duration,
) -> RunReport {
    let wall_s = wall.as_secs_f64();
    let summaries = shared.summaries.lock().map(|s| s.clone()).unwrap_or_default();
    let stages: Vec<StageReport> = graph
        .stages
        .iter()
        .zip(stats)
        .map(|(s, st)| {
            let workers = s.spec.workers;
            let out = st.items_out.load(Ordering::Relaxed);
            StageReport {
                id: s.id().to_string(),
                kind: s.info.kind.to_string(),
                workers,
                items_in: st.items_in.load(Ordering::Relaxed),
                items_out: out,
                item_errors: st.item_errors.load(Ordering::Relaxed),
                errors_by_reason: st.errors_by_reason(),
                items_per_second: if wall_s > 0.0 {
                    ((out.max(st.items_in.load(Ordering::Relaxed)) as f64 / wall_s) * 10.0).round() / 10.0
                } else {
                    0.0
                },
                busy_pct: pct(st.busy_seconds() / workers as f64, wall_s),
                waiting_for_input_pct: pct(st.wait_seconds(), wall_s),
                blocked_on_output_pct: pct(st.blocked_seconds(), wall_s),
                busy_seconds: round3(st.busy_seconds()),
                waiting_for_input_seconds: round3(st.wait_seconds()),
                blocked_on_output_seconds: round3(st.blocked_seconds()),
                details: summaries.get(s.id()).cloned(),
            }
        })
        .collect();

    let cache = (!caches.is_empty()).then(|| {
        let sum = |f: fn(&crate::cache::CacheCounters) -> u64| caches.values().map(|h| f(&h.counters)).sum::<u64>();
        let hits = sum(|c| c.hits.load(Ordering::Relaxed));
        let misses = sum(|c| c.misses.load(Ordering::Relaxed));
        CacheReport {
            hits,
            misses,
            writes: sum(|c| c.writes.load(Ordering::Relaxed)),
            hit_pct: pct(hits as f64, (hits + misses) as f64),
            shared: crate::cache::shared::SharedReport::of(caches.values()),
        }
    });

    let bottleneck =
        stages.iter().max_by(|a, b| a.busy_pct.total_cmp(&b.busy_pct)).filter(|s| s.busy_pct > 0.0).map(|top| {
            let mut sentence = format!("{} is the bottleneck: busy {:.0}%", top.id, top.busy_pct);
            if let Some(blocked) = stages
                .iter()
                .filter(|s| s.id != top.id)
                .max_by(|a, b| a.blocked_on_output_pct.total_cmp(&b.blocked_on_output_pct))
                .filter(|s| s.blocked_on_output_pct >= 10.0)
            {
                let _ = write!(sentence, "; {} blocked on output {:.0}%", blocked.id, blocked.blocked_on_output_pct);
            }
            sentence
        });

    RunReport {
        pipeline: graph.name.clone(),
        wall_seconds: (wall_s * 1000.0).round() / 1000.0,
        setup_seconds: (setup.as_secs_f64() * 1000.0).round() / 1000.0,
        interrupted: shared.signals.interrupted(),
        stages,
        cache,
        skipped: shared.skipped.lock().map(|s| s.clone()).unwrap_or_default(),
        bottleneck,
    }
}

impl RunReport {
    /// `path,stage,reason`, one line per skipped item.
    pub fn skipped_csv(&self) -> String {
        let mut out = String::from("path,stage,reason\n");
        for s in &self.skipped {
            let _ = writeln!(
                out,
                "{},{},{}",
                csv_field(&crate::names::escape_path(&s.path)),
                csv_field(&s.stage),
                csv_field(&s.reason)
            );
        }
        out
    }

    /// The short table printed after every run.
    pub fn table(&self) -> String {
        let mut out = format!(
            "pipeline {} {} in {:.1}s ({:.1}s set-up)\n{:<14} {:<15} {:>8} {:>8} {:>6} {:>9} {:>6} {:>6} {:>8}\n",
            self.pipeline,
            if self.interrupted { "INTERRUPTED" } else { "finished" },
            self.wall_seconds,
            self.setup_seconds,
            "stage",
            "kind",
            "in",
            "out",
            "errors",
            "items/s",
            "busy%",
            "wait%",
            "blocked%"
        );
        for s in &self.stages {
            let _ = writeln!(
                out,
                "{:<14} {:<15} {:>8} {:>8} {:>6} {:>9.1} {:>6.1} {:>6.1} {:>8.1}",
                s.id,
                s.kind,
                s.items_in,
                s.items_out,
                s.item_errors,
                s.items_per_second,
                s.busy_pct,
                s.waiting_for_input_pct,
                s.blocked_on_output_pct
            );
        }
        for s in &self.stages {
            if let Some(line) = s.details.as_ref().and_then(readable) {
                let _ = writeln!(out, "{}: {line}", s.id);
            }
        }
        if let Some(c) = &self.cache {
            let _ = writeln!(
                out,
                "cache: {} hits, {} misses ({:.1}% hits), {} written",
                c.hits, c.misses, c.hit_pct, c.writes
            );
            if let Some(s) = &c.shared {
                let _ = writeln!(out, "{}", s.line());
            }
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "skipped {} item(s):", self.skipped.len());
            for s in &self.skipped {
                let _ = writeln!(out, "  {} [{}]: {}", s.path.display(), s.stage, s.reason);
            }
        }
        // The verdict last, where the eye lands (the CLI adds the report's path).
        if let Some(b) = &self.bottleneck {
            let _ = writeln!(out, "{b}");
        }
        out
    }
}

/// A stage's details for people: `images inferred 160, provider cpu`, the
/// short plain values of its summary, by name. Lists, objects, long texts
/// (a fallback warning, already logged) and empty values stay in report.json.
fn readable(details: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let fields: Vec<String> = details
        .as_object()?
        .iter()
        .filter_map(|(key, value)| {
            let value = match value {
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
                    // Fractions to four places (a loss to 16 digits is noise on a terminal).
                    Some(x) if x != 0.0 && x.abs() < 1e-3 => format!("{x:.2e}"),
                    Some(x) => format!("{x:.4}").trim_end_matches('0').trim_end_matches('.').to_string(),
                    None => n.to_string(),
                },
                Value::String(s) if !s.is_empty() && s.len() <= 60 && !s.contains('\n') => s.clone(),
                _ => return None,
            };
            Some(format!("{} {value}", key.replace('_', " ")))
        })
        .collect();
    (!fields.is_empty()).then(|| fields.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_read_as_words_and_nothing_raw_reaches_the_terminal() {
        let details = serde_json::json!({
            "provider": "cpu", "images_inferred": 160, "tf32": false, "inference_seconds": 9.5, "loss": 0.008447712287306786,
            "tiny": 0.00001234, "zero": 0.0,
            "fallback_warning": "device: auto fell back to CPU: this ONNX Runtime build has no CUDA execution provider",
            "out_dir": null, "layers": [1, 2], "nested": {"a": 1},
        });
        let line = readable(&details).unwrap();
        assert_eq!(
            line,
            "images inferred 160, inference seconds 9.5, loss 0.0084, provider cpu, tf32 false, tiny 1.23e-5, zero 0"
        );
        assert_eq!(readable(&serde_json::json!({"layers": [1]})), None);
        assert_eq!(readable(&serde_json::json!(3)), None);
    }
}
