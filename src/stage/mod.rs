//! The stage API: what a built-in or user stage implements.
//!
//! A stage is a plain object that turns input items into output items. It
//! never sees channels or threads: the runtime decides where it runs, how
//! many copies run (`workers: N`) and what happens when it is slow.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

mod registry;

pub use registry::{KindInfo, OptionsError, Registry};

use crate::cache::{CacheHandle, CacheSpec};
use crate::facts::{Facts, Wants};
use crate::item::{Item, ItemKind, Listed};

/// Where a stage's outputs go. Blocks while the next stage's input is full.
pub trait Emit {
    /// Fails only when the run is being torn down and nobody will read the item.
    fn emit(&mut self, item: Item) -> Result<(), Stopped>;

    /// Sources call this after the last item of each epoch. The runtime
    /// forwards the marker through every stage, after the items before it.
    fn end_epoch(&mut self, marker: EpochEnd) -> Result<(), Stopped>;
}

/// The end of one pass of a source over its items. It flows behind the
/// epoch's items, so a stage that groups items (batch) flushes its partial
/// group and a trainer knows the epoch is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochEnd {
    pub epoch: u32,
    /// The splits the source emitted in this epoch (empty: no splits).
    pub splits: Arc<[String]>,
    /// The source's last epoch.
    pub last: bool,
}

/// Downstream has gone away (fatal error elsewhere); stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// One bad item: counted, listed with its path and skipped (or fatal
    /// when the stage has `on_error: fail`).
    #[error("{path}: {reason}")]
    Item { path: PathBuf, reason: String },
    /// The stage cannot go on; the run stops and names the stage.
    #[error("{0}")]
    Fatal(String),
    #[error("output closed")]
    Stopped,
}

impl From<Stopped> for StageError {
    fn from(_: Stopped) -> Self {
        StageError::Stopped
    }
}

impl StageError {
    /// The reason goes on one log line and one `skipped.csv` row, so line
    /// breaks (some decoders end their messages with one) become spaces.
    pub fn item(path: &Path, reason: impl std::fmt::Display) -> Self {
        let reason = reason.to_string().trim().lines().map(str::trim_end).collect::<Vec<_>>().join(" ");
        StageError::Item { path: path.to_path_buf(), reason }
    }
    pub fn fatal(reason: impl std::fmt::Display) -> Self {
        StageError::Fatal(reason.to_string())
    }
}

/// Shared run state a stage may look at.
#[derive(Debug, Default)]
pub struct RunSignals {
    /// Ctrl-C / SIGTERM: sources stop, everything in flight drains.
    pub interrupted: AtomicBool,
    /// A consumer needs no more epochs (early stopping): sources end after
    /// the epoch they are in.
    pub epochs_done: AtomicBool,
    /// A stage failed: everyone stops as soon as possible.
    pub aborted: AtomicBool,
}

impl RunSignals {
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }
    pub fn aborted(&self) -> bool {
        self.aborted.load(Ordering::Relaxed)
    }
    /// Sources check this between items.
    pub fn should_stop(&self) -> bool {
        self.interrupted() || self.aborted()
    }
}

/// A transform or sink: items in, zero or more items out.
pub trait Stage: Send {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError>;

    /// Called when an end-of-epoch marker arrives, after every item before
    /// it; the runtime forwards the marker afterwards. Stages that run with
    /// `workers: N` are pure transforms and are not called.
    fn end_epoch(&mut self, _marker: &EpochEnd, _out: &mut dyn Emit) -> Result<(), StageError> {
        Ok(())
    }

    /// Called once when the input has ended (also after an interrupt, so
    /// stages can flush; check `signals.interrupted()` before publishing
    /// results that would be incomplete).
    fn finish(&mut self, _out: &mut dyn Emit, _signals: &RunSignals) -> Result<(), StageError> {
        Ok(())
    }

    /// Facts for the run report (e.g. which execution provider ran).
    fn summary(&self) -> Option<serde_json::Value> {
        None
    }

    /// How many images it emits for each image it takes, for the progress
    /// total of the stages after it (`views`: one per view).
    fn images_per_input(&self) -> u64 {
        1
    }
}

/// A stage with no input: produces items until done or told to stop.
pub trait Source: Send {
    /// Called with the handle for item errors so bad files are skipped, not fatal.
    fn run(&mut self, out: &mut dyn Emit, ctx: &SourceContext<'_>) -> Result<(), StageError>;

    /// How many items it will emit, when it knows up front (for progress and ETA).
    fn total(&self) -> Option<u64> {
        None
    }

    /// How many passes over its items `total` covers (`file_reader`'s
    /// epochs). The first pass fills the feature caches and later ones are
    /// served from them, many times faster: the progress ETA does not
    /// extrapolate the first pass over the others.
    fn passes(&self) -> u64 {
        1
    }
}

pub struct SourceContext<'a> {
    pub signals: &'a RunSignals,
    /// Report a skipped item and keep going.
    pub skip: &'a dyn Fn(StageError),
}

pub enum Built {
    Source(Box<dyn Source>),
    Stage(Box<dyn Stage>),
}

/// What the runtime tells a stage when it builds it.
pub struct BuildContext<'a> {
    /// The pipeline's `name`, for metric labels.
    pub pipeline: &'a str,
    pub stage_id: &'a str,
    /// Record metrics? See [`BuildContext::metric_labels`].
    pub metrics: bool,
    /// Index of this copy among `workers` copies.
    pub worker: usize,
    /// How many copies of this stage run (`workers: N`; 1 for a source).
    pub workers: usize,
    /// One slot all copies of this stage share in this run; see [`SharedByCopies`].
    pub shared: Arc<SharedByCopies>,
    /// What arrives on this stage's input, as the graph worked it out.
    pub input: &'a Facts,
    /// The feature cache opened for this stage, when it declared one.
    pub cache: Option<CacheHandle>,
    /// For sources: look items up in a downstream stage's cache before
    /// anything else is done to them (a hit skips decode and inference).
    pub cache_probe: Option<CacheHandle>,
    /// True when a source already looked every item up in `cache`, so
    /// whatever arrives still undone is known to be a miss.
    pub cache_probed_upstream: bool,
    /// The run's signals (a trainer that stops early sets `epochs_done`).
    pub signals: Arc<RunSignals>,
    /// In a sharded run (`convflow run --shard`): what the source emits and
    /// where the sink writes, in place of what the file says.
    pub shard: Option<&'a ShardRun>,
    /// In a run whose passes are chosen from outside (the Python Loader's):
    /// what the source emits, pass after pass, in place of its own epochs.
    pub passes: Option<&'a PassFeed>,
}

/// One pass over a source's listing chosen from outside: listing positions
/// (repeats allowed, as a sampler's padding needs) emitted as epoch
/// `epoch`, so per-item random draws (augmentation) are that epoch's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplicitOrder {
    pub epoch: u32,
    pub positions: Vec<usize>,
}

/// Passes chosen from outside, sent one at a time as the consumer asks for
/// them (the Python Loader: one per epoch), so that one run, its threads
/// and its memory serve every epoch. The source makes each in turn and
/// ends it with its epoch-end marker, and ends when the sender is dropped.
/// A typed run input, never written in a pipeline file.
#[derive(Debug, Clone)]
pub struct PassFeed {
    pub passes: crossbeam_channel::Receiver<ExplicitOrder>,
    /// Raised by the consumer to cut short the pass being made (it stopped
    /// reading it): the source stops at its next item and ends the pass.
    pub cut: Arc<std::sync::atomic::AtomicU64>,
}

/// What one shard of a sharded run gives its stages: a typed run input,
/// never written in a pipeline file.
#[derive(Debug, Clone)]
pub struct ShardRun {
    /// The items the source emits, in order: its range of the plan's manifest.
    pub items: Vec<Listed>,
    /// The folder the sink writes its part into.
    pub out_dir: PathBuf,
}

/// What the copies of one stage (`workers: N`) share in one run: the first
/// copy built puts a value here, the others get the same one. For what
/// cannot be split between copies, such as the one CSV every copy's rows
/// go into. Every copy is built before any runs, so by the first item each
/// copy holds its handle.
#[derive(Default)]
pub struct SharedByCopies(std::sync::Mutex<Option<Arc<dyn std::any::Any + Send + Sync>>>);

impl SharedByCopies {
    /// The shared value, made by `make` for the first copy that asks.
    pub fn get_or_try_init<T: std::any::Any + Send + Sync>(
        &self,
        make: impl FnOnce() -> Result<T, StageError>,
    ) -> Result<Arc<T>, StageError> {
        let mut slot = self.0.lock().map_err(|_| StageError::fatal("a stage copy panicked while building"))?;
        if let Some(v) = slot.as_ref() {
            return v
                .clone()
                .downcast::<T>()
                .map_err(|_| StageError::fatal("internal: the copies of a stage share values of different types"));
        }
        let v = Arc::new(make()?);
        *slot = Some(v.clone());
        Ok(v)
    }
}

/// One line of `convflow stages`.
#[derive(Debug, Clone, Copy)]
pub struct OptionDoc {
    pub name: &'static str,
    pub ty: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// A problem found in a stage's options, before anything runs.
#[derive(Debug, Clone)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

/// A stage kind, implemented on its typed config. Register it with
/// [`Registry::register`]; built-ins are registered the same way.
pub trait StageConfig: DeserializeOwned + Serialize + Send + Sync + 'static {
    /// The `kind:` name in pipeline files.
    const KIND: &'static str;
    const SUMMARY: &'static str;
    /// Item kinds it takes; empty for a source.
    const ACCEPTS: &'static [ItemKind];
    /// Item kind it emits; `None` for a sink.
    const EMITS: Option<ItemKind>;
    const OPTIONS: &'static [OptionDoc];
    /// May several copies run at once (`workers: N`)? Stages that keep state
    /// across items (batching, writing) say no.
    const PARALLEL: bool = false;
    /// Do its options change the pixels a model sees? Then they are part of
    /// the feature cache key.
    const AFFECTS_PIXELS: bool = false;
    /// May items whose features are already known (cache hits) flow past it
    /// untouched? True for pure pixel transforms: their effect is in the key.
    const PASSES_PRECOMPUTED: bool = false;
    /// Does it draw random numbers per item (from seed, `meta.variant`,
    /// content hash), as augmentation does? Then the feature cache keeps
    /// each variant of an image apart.
    const RANDOM: bool = false;
    /// Options that say where or how fast, never what: left out of a
    /// sharded run's fingerprint, so workers with other local paths agree.
    const PLACE_OPTIONS: &'static [&'static str] = &[];
    /// A source whose items a sharded run's plan can list ([`StageConfig::listing`]).
    const LISTS_FILES: bool = false;
    /// A sink whose output folder can be one shard's part, which a merge joins.
    const WRITES_PARTS: bool = false;

    /// Checks beyond types that need nothing outside the file: ranges,
    /// options that exclude each other.
    fn check(&self) -> Vec<FieldError> {
        Vec::new()
    }

    /// Checks of what the file points at: input folders, models and weights
    /// that must exist. Run with [`StageConfig::check`] before every run;
    /// `convflow validate --no-environment` skips them, so a file can be
    /// checked on a machine that has not got its inputs.
    fn check_environment(&self) -> Vec<FieldError> {
        Vec::new()
    }

    /// What this stage emits, given what arrives (`input`; a source gets
    /// [`Facts::default`]): one typed function per stage kind, which also
    /// refuses an input the stage cannot take, naming both sides. `env`:
    /// files the pipeline points at (a trained model's folder) may be read;
    /// false under `validate --no-environment`. The default passes the
    /// input's facts on unchanged.
    fn facts(&self, input: &Facts, _env: bool) -> Result<Facts, Vec<FieldError>> {
        Ok(input.clone())
    }

    /// What this stage needs of what arrives (a head: the preprocessing and
    /// image size it was trained on), so that options left out upstream
    /// (`preprocess: auto`, `size: auto`) take the right value.
    fn wants(&self, _env: bool) -> Wants {
        Wants::default()
    }

    /// These options with what was left out filled in from what the stages
    /// after it want; `None`: nothing to fill.
    fn resolve(&self, _wants: &Wants) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }

    /// For a source with [`StageConfig::LISTS_FILES`]: every item it would
    /// emit, in order, for `convflow plan`.
    fn listing(&self) -> Result<Vec<Listed>, String> {
        Err(format!("`{}` does not list its items", Self::KIND))
    }

    /// The cache this stage reads and fills, if any.
    fn cache(&self) -> Result<Option<CacheSpec>, FieldError> {
        Ok(None)
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError>;

    /// For a trainer: its model as Keras's `model.summary()` prints it
    /// (`convflow summary`), given what arrives. `None`: not a trainer
    /// with a summary.
    fn model_summary(&self, _stage_id: &str, _input: &Facts) -> Option<Result<String, String>> {
        None
    }
}

/// Type-erased [`StageConfig`], as stored in a validated graph.
pub trait AnyStageConfig: Send + Sync {
    fn check(&self) -> Vec<FieldError>;
    fn check_environment(&self) -> Vec<FieldError>;
    fn facts(&self, input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>>;
    fn wants(&self, env: bool) -> Wants;
    fn resolve(&self, wants: &Wants) -> Option<SharedConfig>;
    fn cache(&self) -> Result<Option<CacheSpec>, FieldError>;
    fn listing(&self) -> Result<Vec<Listed>, String>;
    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError>;
    /// Canonical JSON of the options, defaults filled in (for cache keys).
    fn canonical_json(&self) -> String;
    fn model_summary(&self, stage_id: &str, input: &Facts) -> Option<Result<String, String>>;
}

impl<C: StageConfig> AnyStageConfig for C {
    fn check(&self) -> Vec<FieldError> {
        StageConfig::check(self)
    }
    fn check_environment(&self) -> Vec<FieldError> {
        StageConfig::check_environment(self)
    }
    fn facts(&self, input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>> {
        StageConfig::facts(self, input, env)
    }
    fn wants(&self, env: bool) -> Wants {
        StageConfig::wants(self, env)
    }
    fn resolve(&self, wants: &Wants) -> Option<SharedConfig> {
        StageConfig::resolve(self, wants).map(|c| Arc::new(c) as SharedConfig)
    }
    fn cache(&self) -> Result<Option<CacheSpec>, FieldError> {
        StageConfig::cache(self)
    }
    fn listing(&self) -> Result<Vec<Listed>, String> {
        StageConfig::listing(self)
    }
    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        StageConfig::build(self, ctx)
    }
    fn canonical_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
    fn model_summary(&self, stage_id: &str, input: &Facts) -> Option<Result<String, String>> {
        StageConfig::model_summary(self, stage_id, input)
    }
}

pub type SharedConfig = Arc<dyn AnyStageConfig>;
