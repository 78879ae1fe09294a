//! convflow: image pipelines as YAML graphs of stages, run as actors joined
//! by bounded channels.
//!
//! # Layout
//!
//! - [`config`]: YAML -> typed config; `${param}` substitution, `--set`
//!   overrides; every problem with file:line:col, stage id and field.
//! - [`graph`]: the validated DAG: ids, edges, item kinds, topological
//!   order, and the [`facts`] on every edge, worked out in named passes.
//! - [`facts`]: what flows on an edge (item kind, image size and channels,
//!   the model and preprocessing that made features, labels, splits,
//!   epochs, views), and what a trained model was trained on
//!   ([`facts::TrainedOn`]): typed, so mismatches are `validate` errors.
//! - [`runtime`]: a run in phases (plan the caches, build the actors, wire
//!   the bounded edges, start the threads, supervise), worker pools,
//!   ordering, shutdown, and the run report.
//! - [`stage`]: the stage API (what a built-in or user stage implements)
//!   and the registry of kinds, below the graph.
//! - [`stages`]: one file per built-in stage, and `builtin_registry`.
//! - [`training`]: the training loop both trainers (`dense_head`,
//!   `convnet`) share, and their checkpoints.
//! - [`trained`]: a trained model's folder read back typed: a classifier
//!   whichever trainer made it, the VGG block5 and head fine-tuning starts from.
//! - [`item`]: the items that flow along edges.
//! - [`augment`]: Keras `ImageDataGenerator` augmentation as one affine
//!   warp (pure; the `augment` stage and `augment-preview` use it).
//! - [`imaging`]: image codecs the stages, the CLI, `visualize` and the
//!   benches share (resizing with PIL's rules).
//! - [`ml`]: model math with no pipeline in sight: frozen inference through
//!   ONNX Runtime (`ml::onnx`), the conv bases of the book (`ml::bases`),
//!   what every trainer shares (`ml::activation`, `ml::loss`,
//!   `ml::optimizer`), the dense head (`ml::head`), the convnet layers and
//!   VGG16's and VGG19's bases in them (`ml::convnet`) and the CUDA checks (`ml::cuda`).
//! - [`cache`]: the content-addressed, crash-safe feature store.
//! - [`telemetry`]: metric names, per-stage counters, logging.
//! - [`npy`]: streaming `.npy` output.
//! - [`names`]: the one escaping of file names written as text (bytes on
//!   Linux, read back exactly).
//! - [`plot`]: the training curves picture.
//! - [`publish`]: the output folders convflow owns: one writer at a time,
//!   every entry switched to a new version at once.
//! - [`demo`]: the synthetic data set a fresh clone runs on.
//! - [`shard`]: sharded runs on array engines: plan, parts, merge.
//! - [`visualize`]: pictures of what a convnet learned (activations, filter
//!   patterns, Grad-CAM heatmaps).
//! - [`cli`]: the `convflow` command, reusable with a custom registry.

pub mod augment;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod facts;
pub mod graph;
pub mod imaging;
pub mod item;
pub mod ml;
pub mod names;
pub mod npy;
pub mod plot;
pub mod publish;
pub mod runtime;
pub mod shard;
pub mod stage;
pub mod stages;
pub mod telemetry;
pub mod trained;
pub mod training;
pub mod visualize;
