//! The `convflow` command. [`main`] takes a registry so a user's binary can
//! add its own stages and get the very same CLI.

mod shard;
mod visualize;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::augment::AugmentOptions;
use crate::cache::FeatureCache;
use crate::config::{self, ConfigErrors, MetricsConfig};
use crate::graph::Graph;
use crate::runtime::{self, RunError, RunOptions};
use crate::stage::{Registry, RunSignals};

/// Exit codes a script can rely on.
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const INVALID: u8 = 2;
    /// 128 + SIGHUP: the terminal went away (a dropped SSH session);
    /// drained the same way as Ctrl-C, so the report and cache are kept.
    pub const HUNG_UP: u8 = 129;
    /// 128 + SIGINT, the shell convention for "stopped by Ctrl-C".
    pub const INTERRUPTED: u8 = 130;
    /// 128 + SIGTERM: stopped by `kill`, systemd or Kubernetes; drained the
    /// same way as Ctrl-C, told apart so a supervisor can see who stopped it.
    pub const TERMINATED: u8 = 143;
}

pub const DEMO_DATA: &str = ".convflow/demo-data";
/// What `convflow demo` ends with: the README tour's next steps, runnable
/// as they are (the pipelines default to the demo data and its cached features).
const DEMO_NEXT: &str = "\
Next:
  cargo run --release -- run pipelines/feature_extraction.yaml       # train the book's classifier on these features (cached: seconds)
  cargo run --release -- run pipelines/extract_features.yaml --set data_dir=DIR   # your photos: DIR/{train,validation,test}/<class>/*.jpg
  README.md, \"A tour on the book's data\": chapter 5 step by step on the book's photos
";
pub const DEFAULT_CACHE: &str = ".convflow/cache";
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(30);

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x >= 0.0 && x.is_finite() => Ok(Duration::from_secs_f64(x)),
        _ => Err(format!("`{s}`: expected seconds >= 0")),
    }
}

#[derive(Parser)]
#[command(name = "convflow", version, about = "Image pipelines as YAML graphs of stages")]
struct Cli {
    /// Log lines as JSON objects.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Print only errors and the final report path (no progress, no table).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct PipelineArgs {
    /// Pipeline YAML file.
    file: PathBuf,
    /// Override a param: --set name=value (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = config::parse_override)]
    set: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline.
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Write the run report (JSON) here, besides any `report:` in the file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics during the run
        /// (overrides the file's `metrics: {listen: ...}`).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// After Ctrl-C or SIGTERM, how long items in flight may take to
        /// finish (under a supervisor's kill timeout, e.g. Kubernetes' 30 s
        /// grace period, to end with a message rather than a SIGKILL).
        #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
        drain_deadline: Duration,
        /// Run one shard of a plan: I/N, or `auto` / `auto/N` to read the
        /// array engine's index (Slurm, Kubernetes, AWS / GCP Batch).
        #[arg(long, value_name = "I/N|auto|auto/N", requires = "plan")]
        shard: Option<crate::shard::ShardSpec>,
        /// The folder `convflow plan` wrote (its manifest; the parts go there).
        #[arg(long, value_name = "DIR")]
        plan: Option<PathBuf>,
    },
    /// List a pipeline's input once into DIR for N shards (`run --shard`).
    Plan {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Number of shards (engines: many more than GPUs).
        #[arg(long)]
        shards: u64,
        /// The plan folder, shared by every worker and the merge.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Check every part of a plan and write the outputs one process would have.
    Merge {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long, value_name = "DIR")]
        plan: PathBuf,
        /// Write the merged report here too, besides any `report:` in the file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Check pipelines and print every problem with its line:column.
    Validate {
        /// Pipeline YAML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Override a param in each file: --set name=value (repeatable).
        #[arg(long = "set", value_name = "NAME=VALUE", value_parser = config::parse_override)]
        set: Vec<(String, String)>,
        /// Check the files alone, not what they point at: input folders,
        /// models and weights need not exist (a fresh clone, a file written
        /// for another machine).
        #[arg(long)]
        no_environment: bool,
    },
    /// Print every trainer's model as Keras's `model.summary()` does:
    /// layer, output shape, parameters, totals.
    Summary {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Print what flows on each edge of the pipeline (`--dot`: as Graphviz DOT).
    Graph {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Graphviz DOT (edges labelled with their facts) instead of text.
        #[arg(long)]
        dot: bool,
    },
    /// List stage kinds with their options and defaults.
    Stages {
        /// As Markdown: the page docs/stages.md.
        #[arg(long)]
        markdown: bool,
    },
    /// List the conv bases of the book's section 5.3.1: sizes, output
    /// shape, preprocessing, parameters, where the weights come from, set up here or not.
    Models {
        /// The image size (height = width) to give the output shape at.
        #[arg(long, default_value_t = 150)]
        size: u32,
    },
    /// Inspect the feature cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        /// Cache folder.
        #[arg(long, global = true, default_value = DEFAULT_CACHE)]
        dir: PathBuf,
    },
    /// Write a PNG grid of augmented versions of one image (the book's
    /// figure 5.11): the original first, then the draws of epochs 0, 1, ...
    AugmentPreview {
        /// The image.
        image: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// Tiles in the grid, the original included (4 to a row).
        #[arg(long, default_value_t = 8)]
        count: u32,
        /// Seed of the draws (overrides the options' `seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// `augment` options over the book's (rotation 40, shifts 0.2, shear
        /// 0.2, zoom 0.2, horizontal flip, size [150, 150]): inline YAML
        /// such as '{fill_mode: reflect}', a YAML file of options, or a
        /// pipeline file (its `augment` stage).
        #[arg(long)]
        config: Option<String>,
    },
    /// Pictures of what a convnet learned (section 5.4): activations, filter patterns.
    Visualize {
        #[command(subcommand)]
        what: visualize::Visualize,
    },
    /// Make the synthetic demo data set (if missing) and run
    /// pipelines/extract_features.yaml on it.
    Demo {
        /// Override a param of extract_features.yaml.
        #[arg(long = "set", value_name = "NAME=VALUE", value_parser = config::parse_override)]
        set: Vec<(String, String)>,
    },
}

#[derive(Subcommand, Clone, Copy)]
enum CacheAction {
    /// Entries, size, and what each context was computed with.
    Stats,
    /// Check the store and every entry's checksum; exit 1 if anything is wrong.
    Verify,
    /// Delete the cache.
    Clear,
}

pub fn main(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init_logging(cli.log_format == "json");
    match dispatch(cli, &registry) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::FAILED)
        }
    }
}

/// `convflow summary`: each trainer's table; a trainer whose shapes cannot
/// be known is an error naming it.
fn summary(g: &Graph) -> ExitCode {
    let mut printed = 0;
    let mut failed = false;
    for s in &g.stages {
        match s.config.model_summary(s.id(), &s.input) {
            None => {}
            Some(Ok(text)) => {
                print!("{}{text}", if printed > 0 { "\n" } else { "" });
                printed += 1;
            }
            Some(Err(e)) => {
                eprintln!("{}: stage `{}`: {e}", g.file.display(), s.id());
                failed = true;
            }
        }
    }
    if printed == 0 && !failed {
        println!("{}: no trainer with a summary", g.file.display());
    }
    if failed { ExitCode::from(exit::INVALID) } else { ExitCode::SUCCESS }
}

fn load(args: &PipelineArgs, registry: &Registry) -> Result<Graph, ConfigErrors> {
    load_with_metrics(args, registry).map(|(g, _)| g)
}

/// The graph and the file's `metrics:` settings (the graph does not keep them).
fn load_with_metrics(args: &PipelineArgs, registry: &Registry) -> Result<(Graph, MetricsConfig), ConfigErrors> {
    let cfg = config::load(&args.file, &args.set)?;
    let metrics = cfg.metrics.clone();
    Ok((Graph::build(cfg, registry)?, metrics))
}

fn dispatch(cli: Cli, registry: &Registry) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Stages { markdown } => {
            print!("{}", if markdown { registry.describe_markdown() } else { registry.describe() });
            Ok(ExitCode::SUCCESS)
        }
        Command::Models { size } => {
            print!("{}", crate::ml::bases::table(size));
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files, set, no_environment } => {
            let mut code = ExitCode::SUCCESS;
            for file in files {
                let checked =
                    config::load(&file, &set).and_then(|cfg| Graph::build_checked(cfg, registry, !no_environment));
                match checked {
                    Ok(g) => println!("{}: ok ({} stages)", file.display(), g.stages.len()),
                    Err(e) => code = invalid(&e),
                }
            }
            Ok(code)
        }
        Command::Summary { pipeline } => Ok(match load(&pipeline, registry) {
            Ok(g) => summary(&g),
            Err(e) => invalid(&e),
        }),
        Command::Graph { pipeline, dot } => Ok(match load(&pipeline, registry) {
            Ok(g) => {
                print!("{}", if dot { g.to_dot() } else { g.facts_text() });
                ExitCode::SUCCESS
            }
            Err(e) => invalid(&e),
        }),
        Command::Run { pipeline, report, metrics_listen, drain_deadline, shard, plan } => {
            match load_with_metrics(&pipeline, registry) {
                Ok((g, mut metrics)) => {
                    if metrics_listen.is_some() {
                        metrics.listen = metrics_listen;
                    }
                    match (shard, plan) {
                        (Some(spec), Some(plan)) => {
                            let run = |g: &Graph, shard| {
                                run_graph(g, report.as_deref(), &metrics, drain_deadline, cli.quiet, Some(shard))
                            };
                            shard::run_shard(g, spec, &plan, cli.quiet, run)
                        }
                        _ => run_graph(&g, report.as_deref(), &metrics, drain_deadline, cli.quiet, None),
                    }
                }
                Err(e) => Ok(invalid(&e)),
            }
        }
        Command::Plan { pipeline, shards, out } => match load(&pipeline, registry) {
            Ok(g) => shard::plan(&g, shards, &out, cli.quiet),
            Err(e) => Ok(invalid(&e)),
        },
        Command::Merge { pipeline, plan, report } => match load(&pipeline, registry) {
            Ok(g) => shard::merge(&g, &plan, report.as_deref(), cli.quiet),
            Err(e) => Ok(invalid(&e)),
        },
        Command::Demo { set } => {
            let n = crate::demo::generate(Path::new(DEMO_DATA), 42)?;
            if !cli.quiet {
                eprintln!("demo data: {n} synthetic images in {DEMO_DATA}");
            }
            let pipeline = PipelineArgs { file: PathBuf::from("pipelines/extract_features.yaml"), set };
            let code = match load_with_metrics(&pipeline, registry) {
                Ok((g, metrics)) => run_graph(&g, None, &metrics, DEFAULT_DRAIN_DEADLINE, cli.quiet, None)?,
                Err(e) => invalid(&e),
            };
            if code == ExitCode::SUCCESS && !cli.quiet {
                print!("{DEMO_NEXT}");
            }
            Ok(code)
        }
        Command::Cache { action, dir } => cache_command(action, &dir),
        Command::Visualize { what } => {
            visualize::run(what, cli.quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::AugmentPreview { image, out, count, seed, config } => {
            let opts = match preview_options(config.as_deref(), seed) {
                Ok(opts) => opts,
                Err(e) => {
                    eprintln!("augment options: {e}");
                    return Ok(ExitCode::from(exit::INVALID));
                }
            };
            let bytes = std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let img = crate::imaging::decode::decode_image(&bytes, u64::MAX)
                .map_err(|e| anyhow::anyhow!("{}: {e}", image.display()))?;
            let grid = crate::augment::preview_grid(&img, &opts, blake3::hash(&bytes).as_bytes(), count, 4);
            grid.save(&out).with_context(|| format!("writing {}", out.display()))?;
            if !cli.quiet {
                println!("{}: {count} tiles of {}x{}", out.display(), grid.width(), grid.height());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The book's augmentation with `config`'s keys laid over it.
fn preview_options(config: Option<&str>, seed: Option<u64>) -> Result<AugmentOptions, String> {
    let mut options = serde_json::to_value(AugmentOptions::book()).map_err(|e| e.to_string())?;
    let overlay = match config {
        None => serde_json::Value::Null,
        Some(path) if Path::new(path).is_file() => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            let node = config::yaml::parse(&text).map_err(|e| format!("{path}:{}: {}", e.pos, e.message))?;
            if node.get("stages").is_none() {
                node.to_json()
            } else {
                let cfg = config::load(Path::new(path), &[]).map_err(|e| e.to_string())?;
                let stage = cfg
                    .stages
                    .iter()
                    .find(|s| s.kind == <crate::stages::augment::AugmentConfig as crate::stage::StageConfig>::KIND);
                stage.ok_or_else(|| format!("{path} has no augment stage"))?.options.to_json()
            }
        }
        Some(text) => config::yaml::parse(text).map_err(|e| format!("{}: {}", e.pos, e.message))?.to_json(),
    };
    match overlay {
        serde_json::Value::Object(map) => {
            if let Some(o) = options.as_object_mut() {
                o.extend(map);
            }
        }
        serde_json::Value::Null => {}
        other => return Err(format!("expected a mapping of options, got {other}")),
    }
    if let Some(seed) = seed {
        options["seed"] = seed.into();
    }
    let opts: AugmentOptions =
        serde_path_to_error::deserialize(options).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    let errors = opts.check();
    if errors.is_empty() {
        Ok(opts)
    } else {
        Err(errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))
    }
}

fn invalid(e: &ConfigErrors) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(exit::INVALID)
}

fn run_graph(
    graph: &Graph,
    extra_report: Option<&Path>,
    metrics: &MetricsConfig,
    drain_deadline: Duration,
    quiet: bool,
    shard: Option<crate::stage::ShardRun>,
) -> anyhow::Result<ExitCode> {
    let report_paths: Vec<&Path> = graph.report.iter().map(PathBuf::as_path).chain(extra_report).collect();
    // Metrics are recorded when someone will read them: the endpoint, or
    // the snapshot beside a report.
    let exporter = match (metrics.listen, report_paths.is_empty()) {
        (None, true) => None,
        (listen, _) => Some(crate::telemetry::install_prometheus(listen)?),
    };
    let signals = Arc::new(RunSignals::default());
    let stopped_by = watch_signals(signals.clone(), drain_deadline);
    // The exit code of the signal that stopped the run (130 if none recorded).
    let stop_code = || match stopped_by.load(Ordering::Relaxed) {
        0 => exit::INTERRUPTED,
        code => code,
    };
    let options = RunOptions {
        signals,
        drain_deadline,
        metrics: exporter.is_some(),
        progress: crate::telemetry::ProgressMode::auto(quiet),
        shard,
        passes: None,
    };
    let result = runtime::run(graph, &options);
    let (report, code) = match result {
        Ok(report) => {
            let code = if report.interrupted { stop_code() } else { 0 };
            (report, code)
        }
        Err(RunError::Stage { stage, message, report }) => {
            eprintln!("error: stage `{stage}` failed: {message}");
            (*report, exit::FAILED)
        }
        Err(e @ RunError::DrainTimeout { .. }) => {
            // The stages still running are not waited for; their exec workers go now.
            crate::stages::exec::kill_all_workers();
            eprintln!("error: {e}; no report written, outputs not published, the cache holds every committed batch");
            return Ok(ExitCode::from(stop_code()));
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(exit::FAILED));
        }
    };
    // The reports first, then the terminal: a reader that has gone (`convflow
    // run | head`) must cost neither the report nor the exit code.
    for path in &report_paths {
        runtime::write_report(&report, path).with_context(|| format!("cannot write the report {}", path.display()))?;
        if let Some(e) = &exporter {
            let snapshot = runtime::beside(path, runtime::METRICS_SNAPSHOT);
            e.write_snapshot(&snapshot).with_context(|| format!("cannot write {}", snapshot.display()))?;
        }
    }
    if !quiet {
        let mut text = report.table();
        for path in &report_paths {
            text.push_str(&format!("report: {}\n", path.display()));
        }
        // A closed stdout (EPIPE) is the reader's choice, not a failure of the run.
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
    }
    if let Some(addr) = metrics.listen.filter(|_| !metrics.linger.is_zero()) {
        tracing::info!("metrics: serving the final values at http://{addr}/metrics for {:?}", metrics.linger);
        std::thread::sleep(metrics.linger);
    }
    if report.interrupted {
        let by = match code {
            exit::TERMINATED => "SIGTERM",
            exit::HUNG_UP => "SIGHUP",
            _ => "interrupt",
        };
        // After a hang-up stderr may be gone: a failed write is no reason to panic.
        let _ = writeln!(
            std::io::stderr(),
            "stopped by {by}: sources stopped, in-flight items finished, cache flushed; outputs not published"
        );
    }
    Ok(ExitCode::from(code))
}

/// SIGINT / SIGTERM / SIGHUP set the interrupt flag and record which signal
/// came (as its exit code: 130, 143 or 129); a second one exits at once with
/// its own code.
fn watch_signals(signals: Arc<RunSignals>, drain_deadline: Duration) -> Arc<AtomicU8> {
    let stopped_by = Arc::new(AtomicU8::new(0));
    let record = stopped_by.clone();
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
            else {
                return;
            };
            loop {
                let (name, code) = tokio::select! {
                    _ = int.recv() => ("SIGINT", exit::INTERRUPTED),
                    _ = term.recv() => ("SIGTERM", exit::TERMINATED),
                    _ = hup.recv() => ("SIGHUP", exit::HUNG_UP),
                };
                if record.load(Ordering::Relaxed) != 0 {
                    let _ = writeln!(std::io::stderr(), "second signal ({name}): exiting now");
                    crate::stages::exec::kill_all_workers();
                    std::process::exit(code as i32);
                }
                // The code first, so the run never ends seeing the flag without it.
                record.store(code, Ordering::Relaxed);
                signals.interrupted.store(true, Ordering::Relaxed);
                tracing::warn!("{name}: stopping sources and draining in-flight items (deadline {drain_deadline:?})");
            }
        });
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch for Ctrl-C / SIGTERM: {e}");
    }
    stopped_by
}

fn cache_command(action: CacheAction, dir: &Path) -> anyhow::Result<ExitCode> {
    match action {
        CacheAction::Stats => {
            if !dir.join(crate::cache::FILE_NAME).exists() {
                println!("{}: empty (no cache yet)", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            let stats = FeatureCache::open(dir)?.stats()?;
            println!(
                "{}: {} entries, {:.1} MB on disk",
                stats.path.display(),
                stats.entries,
                stats.file_bytes as f64 / 1e6
            );
            for c in &stats.contexts {
                println!(
                    "  context {}: {} entries, {:.1} MB\n    {}",
                    c.id,
                    c.entries,
                    c.value_bytes as f64 / 1e6,
                    c.description
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheAction::Verify => {
            let report = FeatureCache::verify(dir)?;
            println!(
                "{}: {} entries, structure {}, {} corrupt",
                dir.display(),
                report.entries,
                if report.structure_ok { "ok" } else { "REPAIRED" },
                report.corrupt.len()
            );
            for key in &report.corrupt {
                println!("  corrupt entry {key}");
            }
            Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(exit::FAILED) })
        }
        CacheAction::Clear => {
            let removed = FeatureCache::clear(dir)?;
            println!("{}: {}", dir.display(), if removed { "cleared" } else { "nothing to clear" });
            Ok(ExitCode::SUCCESS)
        }
    }
}
