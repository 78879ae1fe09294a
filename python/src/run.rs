//! One run of a graph on a thread of its own, which Python waits on with
//! the GIL released, a slice at a time (so Ctrl-C and progress stay in
//! Python's hands), optionally with a tap on one stage's output.

use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convflow::item::Item;
use convflow::runtime::{self, Envelope, RunError, RunHooks, RunOptions, Tracked};
use convflow::stage::{ExplicitOrder, PassFeed, RunSignals};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::batch::{Batch, assemble, members};
use crate::{RunError as PyRunError, pipeline};

/// How a run ended: the report (JSON) and, if it failed, the CLI's words.
#[derive(Clone)]
struct Outcome {
    error: Option<String>,
    report: Option<String>,
}

struct Inner {
    signals: Arc<RunSignals>,
    done: Receiver<Outcome>,
    outcome: Option<Outcome>,
    tap: Option<Receiver<Envelope>>,
    /// Items taken from the tap, not yet handed out as a batch.
    pending: Vec<Item>,
    /// Regroup the tapped items into batches of this many (None: hand out
    /// each emitted item as it is, a `batch` as one batch).
    group: Option<usize>,
    tap_ended: bool,
    watched: Arc<Mutex<Vec<Tracked>>>,
    /// A run fed its passes (the Loader's epochs): where they go, and how
    /// far the tap has got through them.
    fed: Option<Fed>,
}

/// The Loader's side of a [`PassFeed`]: one run serves every epoch.
struct Fed {
    passes: Sender<ExplicitOrder>,
    cut: Arc<AtomicU64>,
    /// Passes sent; the last one sent is the one being read.
    sent: u64,
    /// Passes whose end-of-epoch marker the tap has seen.
    ended: u64,
}

impl Fed {
    /// Items of a pass before the one being read (cut short: what was in
    /// flight when it was) are dropped, unseen.
    fn stale(&self) -> bool {
        self.ended + 1 < self.sent
    }

    fn reading_ended(&self) -> bool {
        self.ended >= self.sent
    }
}

#[pyclass(module = "convflow._native")]
pub struct Run {
    /// Dropped only in the process that started the run: after a fork the
    /// child's copy of a lock may be held by a thread that does not exist
    /// there, so the child leaks it rather than risk a deadlock.
    inner: ManuallyDrop<Inner>,
    stage: String,
    pid: u32,
}

impl Drop for Run {
    fn drop(&mut self) {
        if std::process::id() == self.pid {
            self.inner.signals.interrupted.store(true, Ordering::Relaxed);
            // SAFETY: dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.inner) };
        }
    }
}

/// Writes the reports as `convflow run` does: report.json, skipped.csv and
/// the metrics snapshot beside each.
fn write_reports(
    report: &runtime::RunReport,
    paths: &[PathBuf],
    exporter: Option<&convflow::telemetry::MetricsExporter>,
) -> Result<(), String> {
    for path in paths {
        runtime::write_report(report, path).map_err(|e| format!("cannot write the report {}: {e}", path.display()))?;
        if let Some(e) = exporter {
            let snapshot = runtime::beside(path, runtime::METRICS_SNAPSHOT);
            e.write_snapshot(&snapshot).map_err(|e| format!("cannot write {}: {e}", snapshot.display()))?;
        }
    }
    Ok(())
}

#[pymethods]
impl Run {
    /// Starts `path` with `params`. `tap`: stream that stage (the graph cut
    /// after it, no reports); `fed`: its `file_reader` makes the passes
    /// [`Run::start_pass`] sends, one run for them all; `group`: batch size
    /// to regroup the tapped items into.
    #[new]
    #[pyo3(signature = (path, params, tap=None, group=None, fed=false, capacity=64))]
    fn new(
        py: Python<'_>,
        path: &str,
        params: Vec<(String, String)>,
        tap: Option<String>,
        group: Option<usize>,
        fed: bool,
        capacity: usize,
    ) -> PyResult<Run> {
        let mut cfg = pipeline::load(py, path, &params)?;
        let metrics_cfg = cfg.metrics.clone();
        if let Some(stage) = &tap {
            crate::check_emits(&cfg, stage)?;
            pipeline::cut_at(&mut cfg, stage).map_err(pyo3::exceptions::PyValueError::new_err)?;
        }
        let graph = pipeline::build(py, cfg, true)?;
        let (feed, fed) = if fed {
            pipeline::file_source(&graph).map_err(pyo3::exceptions::PyValueError::new_err)?;
            let (passes, rx) = unbounded();
            let cut = Arc::new(AtomicU64::new(0));
            (Some(PassFeed { passes: rx, cut: cut.clone() }), Some(Fed { passes, cut, sent: 0, ended: 0 }))
        } else {
            (None, None)
        };
        let report_paths: Vec<PathBuf> = graph.report.iter().cloned().collect();
        // As the CLI: metrics are recorded when someone reads them.
        let exporter = match (metrics_cfg.listen, report_paths.is_empty()) {
            (None, true) => None,
            (listen, _) => Some(
                convflow::telemetry::install_prometheus(listen).map_err(|e| PyRunError::new_err(format!("{e:#}")))?,
            ),
        };
        let signals = Arc::new(RunSignals::default());
        let options = RunOptions {
            signals: signals.clone(),
            drain_deadline: Duration::from_secs(30),
            metrics: exporter.is_some(),
            passes: feed,
            ..RunOptions::default()
        };
        let watched = Arc::new(Mutex::new(Vec::new()));
        let into = watched.clone();
        let mut hooks = RunHooks {
            watch: Some(Box::new(move |t| {
                if let Ok(mut w) = into.lock() {
                    *w = t;
                }
            })),
            ..RunHooks::default()
        };
        let tap_rx = tap.as_ref().map(|stage| {
            let (tx, rx) = bounded(capacity.max(1));
            hooks.taps.push((stage.clone(), tx));
            rx
        });
        let (done_tx, done) = bounded(1);
        std::thread::Builder::new()
            .name("convflow-run".into())
            .spawn(move || {
                let outcome = match runtime::run_with(&graph, &options, hooks) {
                    Ok(report) => {
                        let json = serde_json::to_string(&report).ok();
                        let error = write_reports(&report, &report_paths, exporter.as_ref()).err();
                        Outcome { error, report: json }
                    }
                    Err(RunError::Stage { stage, message, report }) => {
                        let json = serde_json::to_string(&report).ok();
                        let _ = write_reports(&report, &report_paths, exporter.as_ref());
                        Outcome { error: Some(format!("stage `{stage}` failed: {message}")), report: json }
                    }
                    Err(e @ RunError::DrainTimeout { .. }) => {
                        convflow::stages::exec::kill_all_workers();
                        Outcome { error: Some(format!("{e}; no report written, outputs not published")), report: None }
                    }
                    Err(e) => Outcome { error: Some(e.to_string()), report: None },
                };
                let _ = done_tx.send(outcome);
            })
            .map_err(|e| PyRunError::new_err(format!("cannot start the run's thread: {e}")))?;
        Ok(Run {
            inner: ManuallyDrop::new(Inner {
                signals,
                done,
                outcome: None,
                tap: tap_rx,
                pending: Vec::new(),
                group,
                tap_ended: false,
                watched,
                fed,
            }),
            stage: tap.unwrap_or_default(),
            pid: std::process::id(),
        })
    }

    /// Waits up to `timeout` seconds (GIL released) for the run to end:
    /// None while it goes on, else (error or None, report JSON or None).
    fn wait(&mut self, py: Python<'_>, timeout: f64) -> PyResult<Option<(Option<String>, Option<String>)>> {
        self.check_pid()?;
        let inner = &mut *self.inner;
        if inner.outcome.is_none() {
            // Once the run ends nobody reads the tap: drop it, so a stage
            // blocked on it (the consumer stopped early) ends too.
            let done = &inner.done;
            let got = py.detach(|| done.recv_timeout(Duration::from_secs_f64(timeout.max(0.0))));
            match got {
                Ok(o) => inner.outcome = Some(o),
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    inner.outcome = Some(Outcome {
                        error: Some("internal: the run's thread ended without a word".into()),
                        report: None,
                    })
                }
            }
        }
        Ok(inner.outcome.clone().map(|o| (o.error, o.report)))
    }

    /// Stops the sources; items in flight finish (the CLI's Ctrl-C).
    fn interrupt(&self) {
        self.inner.signals.interrupted.store(true, Ordering::Relaxed);
    }

    /// Sends a fed run's next pass: `positions` of the listing, as epoch
    /// `epoch`. What is left of the pass before goes unread: it is cut
    /// short, and its items in flight are dropped.
    fn start_pass(&mut self, epoch: u32, positions: Vec<usize>) -> PyResult<()> {
        self.check_pid()?;
        let inner = &mut *self.inner;
        let Some(fed) = inner.fed.as_mut() else {
            return Err(PyRuntimeError::new_err("this run was not started with fed=True"));
        };
        if !fed.reading_ended() {
            fed.cut.fetch_add(1, Ordering::AcqRel);
        }
        inner.pending.clear();
        // The source ends once the run does; a send to it then is no error
        // here: the tap has ended too, which `ended` reports.
        let _ = fed.passes.send(ExplicitOrder { epoch, positions });
        fed.sent += 1;
        Ok(())
    }

    /// The next batch of the tapped stage, waiting up to `timeout` seconds
    /// (GIL released): None on a timeout or at the end (see `ended`, and
    /// for a fed run `pass_ended`).
    fn next_batch(&mut self, py: Python<'_>, timeout: f64) -> PyResult<Option<Batch>> {
        self.check_pid()?;
        let inner = &mut *self.inner;
        let Some(rx) = inner.tap.as_ref() else {
            return Err(PyRuntimeError::new_err("this run has no tapped stage"));
        };
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        let (pending, group, ended, fed) = (&mut inner.pending, inner.group, &mut inner.tap_ended, &mut inner.fed);
        // Ok(Some(items)): a batch is ready; Ok(None): timeout or end.
        let ready: Option<Vec<Item>> = py.detach(|| {
            loop {
                if let Some(n) = group
                    && pending.len() >= n
                {
                    return Some(pending.drain(..n).collect());
                }
                if *ended || fed.as_ref().is_some_and(Fed::reading_ended) {
                    return (!pending.is_empty()).then(|| std::mem::take(pending));
                }
                match rx.recv_deadline(deadline) {
                    Ok(Envelope::Item(_)) if fed.as_ref().is_some_and(Fed::stale) => {}
                    Ok(Envelope::Item(item)) => match group {
                        Some(_) => members(item, pending),
                        None => {
                            let mut one = Vec::new();
                            members(item, &mut one);
                            return Some(one);
                        }
                    },
                    // A batch never spans two epochs, as the `batch` stage's.
                    Ok(Envelope::EpochEnd(_)) => {
                        if let Some(f) = fed.as_mut() {
                            f.ended += 1;
                        }
                        if !pending.is_empty() {
                            return Some(std::mem::take(pending));
                        }
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => return None,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => *ended = true,
                }
            }
        });
        ready.map(|items| assemble(py, &self.stage, items)).transpose()
    }

    /// A fed run: true once the pass being read has ended and every item
    /// of it was handed out (the run goes on, waiting for the next).
    #[getter]
    fn pass_ended(&self) -> bool {
        self.inner.fed.as_ref().is_some_and(Fed::reading_ended) && self.inner.pending.is_empty()
    }

    /// True once the tapped stage has ended and every item was handed out.
    #[getter]
    fn ended(&self) -> bool {
        self.inner.tap_ended && self.inner.pending.is_empty()
    }

    /// (stage, is_source, done, total or None) for each source and sink.
    fn progress(&self) -> Vec<(String, bool, u64, Option<u64>)> {
        let Ok(w) = self.inner.watched.lock() else { return Vec::new() };
        w.iter()
            .map(|t| (t.stage.clone(), t.role == convflow::telemetry::progress::Role::Source, t.count(), t.total))
            .collect()
    }
}

impl Run {
    fn check_pid(&self) -> PyResult<()> {
        if std::process::id() != self.pid {
            return Err(PyRuntimeError::new_err(format!(
                "convflow: this run was started in process {} and this is process {} (a fork): the run's threads \
                 did not come along. Start the Pipeline or Loader's iteration in this process instead (after the \
                 fork, e.g. in a DataLoader worker_init_fn, or with the 'spawn' start method)",
                self.pid,
                std::process::id()
            )));
        }
        Ok(())
    }
}
