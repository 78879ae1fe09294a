//! Builds actors from a validated graph and runs them.
//!
//! Every stage runs on its own OS thread (or a pool of them), never on an
//! async executor: all of them are CPU work. Each edge is a bounded
//! crossbeam channel, so a slow stage holds back those before it and memory
//! stays bounded. End of input drains the graph in order; an interrupt
//! stops the sources and lets what is in flight finish; a fatal error
//! stops everyone and names the stage.

mod actor;
pub mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::cache::{CacheHandle, FeatureCache};
use crate::graph::Graph;
use crate::stage::{BuildContext, Built, RunSignals};
pub use crate::telemetry::progress::Tracked;
use crate::telemetry::progress::{Progress, Role};
use crate::telemetry::{self, ProgressMode, StageLabels, StageStats};
pub use actor::Envelope;
use actor::{EmitMetrics, Emitter, StageRun};
pub use report::{RunReport, Skipped};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("stage `{stage}`: {message}")]
    Build { stage: String, message: String },
    #[error("stage `{stage}` failed: {message}")]
    Stage { stage: String, message: String, report: Box<RunReport> },
    #[error("interrupted; stages still running after the {deadline:?} drain deadline: {stages}")]
    DrainTimeout { stages: String, deadline: Duration },
}

pub struct RunOptions {
    pub signals: Arc<RunSignals>,
    /// After an interrupt, how long in-flight items may take to finish.
    pub drain_deadline: Duration,
    /// Record metrics through the `metrics` facade (a no-op until a recorder
    /// such as [`telemetry::install_prometheus`] is installed). Off: not even
    /// the handles are touched.
    pub metrics: bool,
    /// Live progress of sources and sinks.
    pub progress: ProgressMode,
    /// One shard of a sharded run: the source's items and the sink's folder.
    pub shard: Option<crate::stage::ShardRun>,
    /// Passes chosen from outside for the source (the Python Loader's).
    pub passes: Option<crate::stage::PassFeed>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            signals: Arc::new(RunSignals::default()),
            drain_deadline: Duration::from_secs(30),
            metrics: true,
            progress: ProgressMode::Off,
            shard: None,
            passes: None,
        }
    }
}

/// What a program that embeds convflow (the Python package) adds to a run;
/// the CLI adds nothing.
#[derive(Default)]
pub struct RunHooks {
    /// (stage id, sender): what the stage emits, its end-of-epoch markers
    /// included, also goes here, after its own edges. A full channel holds
    /// the stage back as an edge does; a dropped receiver stops it (and so
    /// the run) as a closed edge does.
    pub taps: Vec<(String, Sender<Envelope>)>,
    /// Called once, when every stage is built and before any starts, with
    /// the counters that progress reads (a source's items out, a sink's
    /// items in), so the embedding program can show progress its own way.
    pub watch: Option<Box<dyn FnOnce(Vec<Tracked>) + Send>>,
}

/// State every actor shares: signals, the skipped list, errors, summaries.
pub struct Shared {
    pub signals: Arc<RunSignals>,
    skipped: Mutex<Vec<Skipped>>,
    failure: Mutex<Option<(String, String)>>,
    summaries: Mutex<HashMap<String, serde_json::Value>>,
}

impl Shared {
    fn skip(&self, stage: &str, path: PathBuf, reason: String) {
        if let Ok(mut s) = self.skipped.lock() {
            s.push(Skipped { stage: stage.to_string(), path, reason });
        }
    }

    /// The first fatal error wins; everyone else is told to stop.
    fn fail(&self, stage: &str, message: String) {
        tracing::error!(stage, "{message}");
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert((stage.to_string(), message));
        }
        self.signals.aborted.store(true, Ordering::Relaxed);
    }

    /// Workers of one pool each report; their numbers add up.
    fn summarize(&self, stage: &str, summary: Option<serde_json::Value>) {
        if let (Some(v), Ok(mut s)) = (summary, self.summaries.lock()) {
            match s.get_mut(stage) {
                Some(existing) => merge_summary(existing, v),
                None => {
                    s.insert(stage.to_string(), v);
                }
            }
        }
    }
}

/// Adds numbers field by field (recursively); anything else keeps the first value.
fn merge_summary(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge_summary(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (serde_json::Value::Number(a), serde_json::Value::Number(b)) => {
            let sum = match (a.as_u64(), b.as_u64()) {
                (Some(x), Some(y)) => serde_json::Value::from(x + y),
                _ => serde_json::Value::from(a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0)),
            };
            *a = match sum {
                serde_json::Value::Number(n) => n,
                _ => a.clone(),
            };
        }
        _ => {}
    }
}

/// Marks the run failed if a stage thread panics, so the graph never
/// mistakes a crash for a clean end of input.
struct PanicGuard<'a> {
    shared: &'a Shared,
    stage: &'a str,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.fail(self.stage, "panicked (a bug in this stage)".into());
        }
    }
}

/// Opens the caches the stages declared and works out which sources can
/// look items up before anything else touches them.
struct CachePlan {
    handles: HashMap<usize, CacheHandle>,
    probes: HashMap<usize, CacheHandle>,
    probed: Vec<usize>,
}

fn plan_caches(graph: &Graph) -> Result<CachePlan, RunError> {
    let mut open: HashMap<PathBuf, Arc<FeatureCache>> = HashMap::new();
    let mut tiers: HashMap<String, Arc<crate::cache::shared::SharedTier>> = HashMap::new();
    let mut plan = CachePlan { handles: HashMap::new(), probes: HashMap::new(), probed: Vec::new() };
    for (i, stage) in graph.stages.iter().enumerate() {
        let build_err = |message: String| RunError::Build { stage: stage.id().to_string(), message };
        let Some(spec) = stage.config.cache().map_err(|e| build_err(format!("{}: {}", e.field, e.message)))? else {
            continue;
        };
        // The shared tier first: one that cannot be reached is an error
        // before anything, the local store included, is touched.
        let tier = match &spec.shared {
            None => None,
            Some(url) => Some(match tiers.get(url) {
                Some(t) => t.clone(),
                None => {
                    let t = Arc::new(
                        crate::cache::shared::SharedTier::open(url)
                            .map_err(|e| build_err(format!("field `shared_cache`: {e}")))?,
                    );
                    tiers.insert(url.clone(), t.clone());
                    t
                }
            }),
        };
        let cache = match open.get(&spec.dir) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(FeatureCache::open(&spec.dir).map_err(|e| build_err(e.to_string()))?);
                open.insert(spec.dir.clone(), c.clone());
                c
            }
        };
        // Everything upstream that changes pixels is part of the key.
        let pixel_stages: Vec<_> =
            graph.ancestors(i).into_iter().map(|j| &graph.stages[j]).filter(|s| s.info.affects_pixels).collect();
        let upstream: Vec<String> =
            pixel_stages.iter().map(|s| format!("{} {}", s.info.kind, s.config.canonical_json())).collect();
        let description = format!("{} | {}", spec.key, upstream.join(" | "));
        let by_variant = pixel_stages.iter().any(|s| s.info.random);
        let mut handle = cache.context(&description, by_variant).map_err(|e| build_err(e.to_string()))?;
        if let Some(tier) = tier {
            handle = handle.with_shared(tier);
        }
        if let Some(source) = probe_source(graph, i) {
            plan.probes.insert(source, handle.clone());
            plan.probed.push(i);
        }
        plan.handles.insert(i, handle);
    }
    Ok(plan)
}

/// The source feeding stage `i` through a plain chain of stages that let
/// finished features pass, if there is exactly such a chain.
fn probe_source(graph: &Graph, i: usize) -> Option<usize> {
    let mut current = i;
    loop {
        let [up] = graph.stages[current].inputs[..] else { return None };
        let s = &graph.stages[up];
        if s.outputs.len() != 1 {
            return None;
        }
        if s.info.is_source() {
            return Some(up);
        }
        let lets_features_through =
            s.info.passes_precomputed || s.info.accepts.contains(&crate::item::ItemKind::Features);
        if !lets_features_through {
            return None;
        }
        current = up;
    }
}

/// The cache counters live in the cache handles (plain atomics the cache
/// code bumps); they are copied into the metrics while the run goes and
/// once more at its end, so the last values equal the report's.
struct CacheMetrics(Vec<(Arc<crate::cache::CacheCounters>, [metrics::Counter; 3])>);

impl CacheMetrics {
    fn new(handles: &HashMap<usize, CacheHandle>, labels: &[StageLabels]) -> Self {
        CacheMetrics(
            handles
                .iter()
                .map(|(&i, h)| {
                    let l = &labels[i];
                    (
                        h.counters.clone(),
                        [
                            l.counter(telemetry::CACHE_HITS),
                            l.counter(telemetry::CACHE_MISSES),
                            l.counter(telemetry::CACHE_WRITES),
                        ],
                    )
                })
                .collect(),
        )
    }

    fn sync(&self) {
        for (c, [hits, misses, writes]) in &self.0 {
            hits.absolute(c.hits.load(Ordering::Relaxed));
            misses.absolute(c.misses.load(Ordering::Relaxed));
            writes.absolute(c.writes.load(Ordering::Relaxed));
        }
    }
}

/// The busy / waiting / blocked seconds, copied from the stages' atomics
/// every ~100 ms and at the end (cheaper than a float update per item).
struct TimeMetrics(Vec<(Arc<StageStats>, [metrics::Gauge; 3])>);

impl TimeMetrics {
    fn new(stats: &[Arc<StageStats>], labels: &[StageLabels]) -> Self {
        TimeMetrics(
            stats
                .iter()
                .zip(labels)
                .filter(|(_, l)| l.enabled())
                .map(|(s, l)| {
                    (
                        s.clone(),
                        [
                            l.gauge(telemetry::BUSY_SECONDS),
                            l.gauge(telemetry::INPUT_WAIT_SECONDS),
                            l.gauge(telemetry::OUTPUT_BLOCKED_SECONDS),
                        ],
                    )
                })
                .collect(),
        )
    }

    fn sync(&self) {
        for (s, [busy, wait, blocked]) in &self.0 {
            busy.set(s.busy_seconds());
            wait.set(s.wait_seconds());
            blocked.set(s.blocked_seconds());
        }
    }
}

enum Actor {
    Source(Box<dyn crate::stage::Source>),
    Single(Box<dyn crate::stage::Stage>),
    Pool(Vec<Box<dyn crate::stage::Stage>>),
}

/// Runs the graph to completion (or interrupt) and returns the report, in
/// five phases: plan the caches, build every stage (so a bad config or a
/// missing model stops before any work), wire the bounded edges, start one
/// thread per actor, supervise them to the end; then report.
pub fn run(graph: &Graph, options: &RunOptions) -> Result<RunReport, RunError> {
    run_with(graph, options, RunHooks::default())
}

/// [`run`], with taps on stages' outputs and a view of the progress counters.
pub fn run_with(graph: &Graph, options: &RunOptions, hooks: RunHooks) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let caches = plan_caches(graph)?;
    let actors = build_actors(graph, options, &caches)?;
    let edges = wire_edges(graph);
    let setup = started.elapsed();
    let shared = Arc::new(Shared {
        signals: options.signals.clone(),
        skipped: Mutex::new(Vec::new()),
        failure: Mutex::new(None),
        summaries: Mutex::new(HashMap::new()),
    });
    let mut taps: Vec<Vec<Sender<Envelope>>> = vec![Vec::new(); graph.stages.len()];
    for (id, tx) in hooks.taps {
        let Some(i) = graph.stages.iter().position(|s| s.id() == id) else {
            return Err(RunError::Build { stage: id, message: "no such stage to tap".into() });
        };
        taps[i].push(tx);
    }
    let mut instruments = Instruments::new(graph, options, &caches, &edges, &actors);
    if let Some(watch) = hooks.watch {
        watch(instruments.progress.tracked().to_vec());
    }
    let running = start_actors(graph, actors, edges, taps, &instruments, &shared)?;
    supervise(graph, options, running, &mut instruments)?;

    let report = report::build(graph, &instruments.stats, &shared, &caches.handles, started.elapsed(), setup);
    let failure = shared.failure.lock().ok().and_then(|mut f| f.take());
    match failure {
        Some((stage, message)) => Err(RunError::Stage { stage, message, report: Box::new(report) }),
        None => Ok(report),
    }
}

/// Builds every copy of every stage before any thread starts.
fn build_actors(graph: &Graph, options: &RunOptions, caches: &CachePlan) -> Result<Vec<Actor>, RunError> {
    let mut actors = Vec::new();
    for (i, stage) in graph.stages.iter().enumerate() {
        let copies = if stage.info.is_source() { 1 } else { stage.spec.workers };
        let mut built = Vec::new();
        let shared = Arc::new(crate::stage::SharedByCopies::default());
        for worker in 0..copies {
            let ctx = BuildContext {
                pipeline: &graph.name,
                stage_id: stage.id(),
                metrics: options.metrics,
                worker,
                workers: copies,
                shared: shared.clone(),
                input: &stage.input,
                cache: caches.handles.get(&i).cloned(),
                cache_probe: caches.probes.get(&i).cloned(),
                cache_probed_upstream: caches.probed.contains(&i),
                signals: options.signals.clone(),
                shard: options.shard.as_ref(),
                passes: options.passes.as_ref(),
            };
            let b = stage
                .config
                .build(&ctx)
                .map_err(|e| RunError::Build { stage: stage.id().to_string(), message: e.to_string() })?;
            built.push(b);
        }
        let actor = match (built.len(), built.pop()) {
            (_, Some(Built::Source(s))) => Actor::Source(s),
            (1, Some(Built::Stage(s))) => Actor::Single(s),
            (_, Some(Built::Stage(s))) => {
                let mut all: Vec<_> =
                    built.into_iter().filter_map(|b| if let Built::Stage(s) = b { Some(s) } else { None }).collect();
                all.push(s);
                Actor::Pool(all)
            }
            (_, None) => unreachable!("at least one copy is built"),
        };
        actors.push(actor);
    }
    Ok(actors)
}

/// One bounded input channel per consuming stage; all its inputs send to it.
/// Sources have neither end.
struct Edges {
    senders: Vec<Option<Sender<Envelope>>>,
    receivers: Vec<Option<Receiver<Envelope>>>,
}

fn wire_edges(graph: &Graph) -> Edges {
    let mut edges = Edges { senders: Vec::new(), receivers: Vec::new() };
    for stage in &graph.stages {
        if stage.info.is_source() {
            edges.senders.push(None);
            edges.receivers.push(None);
        } else {
            let (tx, rx) = bounded(stage.spec.channel_capacity.unwrap_or(graph.channel_capacity));
            edges.senders.push(Some(tx));
            edges.receivers.push(Some(rx));
        }
    }
    edges
}

/// How many images each stage will see, where the sources know their count:
/// a source's own total, then each stage's inputs summed (a fan-out sends
/// every item to each consumer) times what it makes of one (`views`).
fn expected_images(graph: &Graph, actors: &[Actor]) -> Vec<Option<u64>> {
    expected(graph, actors, |s| s.total())
}

/// How many of those come in the sources' first pass (the cold one, when
/// later passes come from a cache).
fn first_pass_images(graph: &Graph, actors: &[Actor]) -> Vec<Option<u64>> {
    expected(graph, actors, |s| s.total().map(|n| n / s.passes().max(1)))
}

/// What each stage sees when each source emits `of_source` of it.
fn expected(
    graph: &Graph,
    actors: &[Actor],
    of_source: impl Fn(&dyn crate::stage::Source) -> Option<u64>,
) -> Vec<Option<u64>> {
    let mut totals = vec![None; graph.stages.len()];
    for &i in &graph.order {
        totals[i] = match &actors[i] {
            Actor::Source(s) => of_source(s.as_ref()),
            Actor::Single(s) => sum_inputs(&totals, &graph.stages[i].inputs).map(|n| n * s.images_per_input()),
            Actor::Pool(pool) => sum_inputs(&totals, &graph.stages[i].inputs).map(|n| n * pool[0].images_per_input()),
        };
    }
    totals
}

fn sum_inputs(totals: &[Option<u64>], inputs: &[usize]) -> Option<u64> {
    inputs.iter().map(|&j| totals[j]).sum()
}

/// What watches the run: per-stage counters, the Prometheus series (each
/// present from the start, reading 0 rather than missing) and the progress
/// display of the sources and sinks.
struct Instruments {
    stats: Vec<Arc<StageStats>>,
    labels: Vec<StageLabels>,
    fills: Vec<metrics::Gauge>,
    cache_metrics: CacheMetrics,
    time_metrics: TimeMetrics,
    progress: Progress,
}

impl Instruments {
    fn new(graph: &Graph, options: &RunOptions, caches: &CachePlan, edges: &Edges, actors: &[Actor]) -> Instruments {
        let stats: Vec<Arc<StageStats>> = graph.stages.iter().map(|_| Arc::new(StageStats::default())).collect();
        let labels: Vec<StageLabels> =
            graph.stages.iter().map(|s| StageLabels::new(&graph.name, s.id(), options.metrics)).collect();
        let fills: Vec<metrics::Gauge> = labels
            .iter()
            .zip(&edges.senders)
            .map(|(l, tx)| if tx.is_some() { l.gauge(telemetry::CHANNEL_FILL) } else { metrics::Gauge::noop() })
            .collect();
        for (i, tx) in edges.senders.iter().enumerate() {
            if let Some(tx) = tx {
                labels[i].gauge(telemetry::CHANNEL_CAPACITY).set(tx.capacity().unwrap_or(0) as f64);
                fills[i].set(0.0);
            }
            labels[i].counter(telemetry::ITEMS_IN).absolute(0);
            labels[i].counter(telemetry::ITEMS_OUT).absolute(0);
        }
        let cache_metrics = CacheMetrics::new(&caches.handles, &labels);
        cache_metrics.sync();
        let time_metrics = TimeMetrics::new(&stats, &labels);
        time_metrics.sync();
        let mut tracked = Vec::new();
        let totals = expected_images(graph, actors);
        let first_passes = first_pass_images(graph, actors);
        for (i, stage) in graph.stages.iter().enumerate() {
            if let (Some(n), true) = (totals[i], stage.info.is_source()) {
                labels[i].gauge(telemetry::SOURCE_EXPECTED).set(n as f64);
            }
            let role = if stage.info.is_source() {
                Role::Source
            } else if stage.outputs.is_empty() {
                Role::Sink
            } else {
                continue;
            };
            // A first pass shorter than the total: several passes, the first cold.
            let first_pass = first_passes[i].filter(|&p| totals[i].is_some_and(|n| p < n));
            tracked.push(Tracked {
                stage: stage.id().to_string(),
                role,
                total: totals[i],
                first_pass,
                stats: stats[i].clone(),
            });
        }
        let progress = Progress::new(options.progress, tracked);
        Instruments { stats, labels, fills, cache_metrics, time_metrics, progress }
    }

    fn sync(&mut self) {
        self.progress.tick();
        self.cache_metrics.sync();
        self.time_metrics.sync();
    }
}

/// The actors' threads, and the channel on which each says it has ended.
struct Running {
    handles: Vec<Option<std::thread::JoinHandle<()>>>,
    exited: Receiver<usize>,
}

/// Starts one thread per actor. The edges are consumed: once every sender
/// is held by an actor alone, channels close as stages finish.
fn start_actors(
    graph: &Graph,
    actors: Vec<Actor>,
    mut edges: Edges,
    mut taps: Vec<Vec<Sender<Envelope>>>,
    inst: &Instruments,
    shared: &Arc<Shared>,
) -> Result<Running, RunError> {
    let (exit_tx, exited) = crossbeam_channel::unbounded::<usize>();
    let mut handles = Vec::new();
    for (i, actor) in actors.into_iter().enumerate() {
        let stage = &graph.stages[i];
        let l = &inst.labels[i];
        let out = Emitter {
            // Taps last: `fills` below pairs with the edges only.
            senders: stage
                .outputs
                .iter()
                .filter_map(|&j| edges.senders[j].clone())
                .chain(std::mem::take(&mut taps[i]))
                .collect(),
            stats: inst.stats[i].clone(),
            metrics: EmitMetrics {
                items_out: l.counter(telemetry::ITEMS_OUT),
                fills: stage
                    .outputs
                    .iter()
                    .filter(|&&j| edges.senders[j].is_some())
                    .map(|&j| inst.fills[j].clone())
                    .collect(),
            },
        };
        let run = Arc::new(StageRun {
            id: stage.id().to_string(),
            labels: l.clone(),
            items_in: l.counter(telemetry::ITEMS_IN),
            fill: inst.fills[i].clone(),
            on_error: stage.spec.on_error,
            passes_precomputed: stage.info.passes_precomputed,
            shared: shared.clone(),
            stats: inst.stats[i].clone(),
        });
        let rx = edges.receivers[i].take();
        let exit_tx = exit_tx.clone();
        let handle = std::thread::Builder::new()
            .name(stage.id().to_string())
            .spawn(move || {
                let _guard = PanicGuard { shared: &run.shared, stage: &run.id };
                match (actor, rx) {
                    (Actor::Source(s), _) => run.source(s, out),
                    (Actor::Single(s), Some(rx)) => run.single(s, rx, out),
                    (Actor::Pool(p), Some(rx)) => run.clone().pool(p, rx, out),
                    _ => unreachable!("consumers have a receiver"),
                }
                let _ = exit_tx.send(i);
            })
            .map_err(|e| RunError::Build {
                stage: stage.id().to_string(),
                message: format!("cannot start thread: {e}"),
            })?;
        handles.push(Some(handle));
    }
    Ok(Running { handles, exited })
}

/// Waits for every actor; after an interrupt, only until the drain deadline,
/// then names the stages still running.
fn supervise(graph: &Graph, options: &RunOptions, mut r: Running, inst: &mut Instruments) -> Result<(), RunError> {
    let mut running = graph.stages.len();
    let mut deadline: Option<Instant> = None;
    while running > 0 {
        inst.sync();
        if deadline.is_none() && options.signals.should_stop() {
            deadline = Some(Instant::now() + options.drain_deadline);
        }
        match r.exited.recv_timeout(Duration::from_millis(100)) {
            Ok(i) => {
                if let Some(h) = r.handles[i].take() {
                    let _ = h.join();
                }
                running -= 1;
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if deadline.is_some_and(|d| Instant::now() > d) {
                    let stages: Vec<&str> = r
                        .handles
                        .iter()
                        .enumerate()
                        .filter(|(_, h)| h.is_some())
                        .map(|(i, _)| graph.stages[i].id())
                        .collect();
                    return Err(RunError::DrainTimeout { stages: stages.join(", "), deadline: options.drain_deadline });
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
    }
    inst.progress.finish();
    inst.cache_metrics.sync();
    inst.time_metrics.sync();
    Ok(())
}

/// Writes the report as JSON, creating the folder, and `skipped.csv`
/// (path,stage,reason) beside it when anything was skipped.
pub fn write_report(report: &RunReport, path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report).map_err(std::io::Error::other)? + "\n")?;
    let csv = beside(path, SKIPPED_CSV);
    if report.skipped.is_empty() {
        // A stale list from an earlier run would be a lie.
        match std::fs::remove_file(&csv) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    } else {
        std::fs::write(&csv, report.skipped_csv())?;
    }
    Ok(())
}

pub const SKIPPED_CSV: &str = "skipped.csv";
pub const METRICS_SNAPSHOT: &str = "metrics.prom";

/// `name` in the folder of `report` (`out/report.json` -> `out/name`).
pub fn beside(report: &Path, name: &str) -> PathBuf {
    report.parent().map(|d| d.join(name)).unwrap_or_else(|| PathBuf::from(name))
}
