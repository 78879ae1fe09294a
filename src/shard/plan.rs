//! `convflow plan FILE --shards N --out DIR`: checks that the pipeline can
//! be sharded, lists its source once into DIR's manifest and writes
//! `plan.json` (last, so a plan folder with it is complete).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::{self, ManifestEntry};
use super::{ShardInput, fingerprint};
use crate::graph::Graph;
use crate::item::ClassMode;

pub const PLAN: &str = "plan.json";
pub const PARTS: &str = "parts";
pub const FORMAT: &str = "convflow-plan/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: String,
    pub pipeline: String,
    /// The run's fingerprint: every part carries it; the merge checks it.
    pub fingerprint: String,
    pub pipeline_fingerprint: String,
    pub manifest_blake3: String,
    pub shards: u64,
    pub items: u64,
    /// The `file_reader` stage the manifest replaces.
    pub source: String,
    /// The `feature_writer` stage whose files the parts hold.
    pub sink: String,
    pub classes: Vec<String>,
    pub class_mode: ClassMode,
    pub splits: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{file}: cannot be sharded: {message}")]
    NotShardable { file: PathBuf, message: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0}")]
    Other(String),
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> PlanError {
    PlanError::Io { path: path.to_path_buf(), message: e.to_string() }
}

/// The source and sink stages of a shardable pipeline: exactly one
/// `file_reader` (one pass, in listing order) and one `feature_writer`, the
/// only sink; and no stage that turns one image into several rows.
pub fn shardable(graph: &Graph) -> Result<(usize, usize), PlanError> {
    let no = |message: String| PlanError::NotShardable { file: graph.file.clone(), message };
    let sources: Vec<usize> = (0..graph.stages.len()).filter(|&i| graph.stages[i].info.is_source()).collect();
    let [source] = sources[..] else {
        return Err(no(format!("it has {} sources; a sharded run splits exactly one file_reader", sources.len())));
    };
    let s = &graph.stages[source];
    if !s.info.lists_files {
        return Err(no(format!(
            "stage `{}` is a `{}`, which does not list its items; only a listing source (file_reader) can be sharded",
            s.id(),
            s.info.kind
        )));
    }
    if s.output.epochs != 1 {
        return Err(no(format!(
            "stage `{}`: field `epochs`: must be 1 (training needs every item in one process)",
            s.id()
        )));
    }
    if s.output.shuffled {
        return Err(no(format!(
            "stage `{}`: field `shuffle`: a sharded run writes in listing order; set it false",
            s.id()
        )));
    }
    let sinks: Vec<usize> = (0..graph.stages.len()).filter(|&i| graph.stages[i].outputs.is_empty()).collect();
    let [sink] = sinks[..] else {
        let names: Vec<&str> = sinks.iter().map(|&i| graph.stages[i].id()).collect();
        return Err(no(format!(
            "it has {} sinks ({}); a sharded run needs one feature_writer",
            sinks.len(),
            names.join(", ")
        )));
    };
    if !graph.stages[sink].info.writes_parts {
        let k = &graph.stages[sink];
        return Err(no(format!(
            "stage `{}` is a `{}`; the parts a merge joins come from a feature_writer",
            k.id(),
            k.info.kind
        )));
    }
    if let Some(v) = graph.stages.iter().find(|s| s.output.views > 1) {
        return Err(no(format!(
            "stage `{}`: several rows per image (views) cannot be given one position each",
            v.id()
        )));
    }
    Ok((source, sink))
}

impl Plan {
    pub fn load(dir: &Path) -> Result<Plan, PlanError> {
        let path = dir.join(PLAN);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            io_err(&path, format!("{e} (write the plan first: convflow plan FILE --shards N --out DIR)"))
        })?;
        let plan: Plan = serde_json::from_str(&text).map_err(|e| io_err(&path, e))?;
        if plan.format != FORMAT {
            return Err(io_err(&path, format!("format `{}`, this convflow reads `{FORMAT}`", plan.format)));
        }
        Ok(plan)
    }

    /// Does `graph` still describe the planned run? Every shard and the
    /// merge ask before any work.
    pub fn check(&self, graph: &Graph, dir: &Path) -> Result<(), PlanError> {
        shardable(graph)?;
        let fp = fingerprint::pipeline(graph).map_err(PlanError::Other)?;
        if fp != self.pipeline_fingerprint {
            return Err(PlanError::Other(format!(
                "{} differs from the pipeline planned in {} (pipeline fingerprint {} != {}): same file and --set \
                 values as for `convflow plan`, or plan again into a new folder",
                graph.file.display(),
                dir.display(),
                short(&fp),
                short(&self.pipeline_fingerprint)
            )));
        }
        Ok(())
    }

    pub fn shard_input(&self, dir: &Path, index: u64) -> ShardInput {
        let (start, end) = super::range(index, self.shards, self.items);
        ShardInput { plan_dir: dir.to_path_buf(), start, end }
    }

    pub fn parts_dir(dir: &Path) -> PathBuf {
        dir.join(PARTS)
    }
}

pub fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

/// Lists the source and writes the plan into `dir` (created).
pub fn make(graph: &Graph, dir: &Path, shards: u64) -> Result<Plan, PlanError> {
    if shards == 0 {
        return Err(PlanError::Other("--shards must be at least 1".into()));
    }
    let (source, sink) = shardable(graph)?;
    if dir.join(PLAN).exists() {
        return Err(io_err(&dir.join(PLAN), "a plan is already here: plan into a new folder (its parts belong to it)"));
    }
    std::fs::create_dir_all(Plan::parts_dir(dir)).map_err(|e| io_err(dir, e))?;
    let listing = graph.stages[source]
        .config
        .listing()
        .map_err(|e| PlanError::Other(format!("stage `{}`: {e}", graph.stages[source].id())))?;
    let classes: Vec<String> =
        listing.iter().find_map(|(_, l, _)| l.as_ref().map(|l| l.classes.to_vec())).unwrap_or_default();
    let class_mode = listing.iter().find_map(|(_, l, _)| l.as_ref().map(|l| l.mode)).unwrap_or(ClassMode::None);
    let splits = graph.stages[source].output.splits.clone();
    let entries = listing.into_iter().map(|(path, label, split)| ManifestEntry {
        split: split.and_then(|s| splits.iter().position(|x| **x == *s)).map(|i| i as u32),
        label: label.map(|l| l.index),
        path,
    });
    let (items, manifest_blake3) = manifest::write(dir, entries).map_err(|e| io_err(dir, e))?;
    let pipeline_fingerprint = fingerprint::pipeline(graph).map_err(PlanError::Other)?;
    let plan = Plan {
        format: FORMAT.into(),
        pipeline: graph.name.clone(),
        fingerprint: fingerprint::run(&pipeline_fingerprint, &manifest_blake3, shards),
        pipeline_fingerprint,
        manifest_blake3,
        shards,
        items,
        source: graph.stages[source].id().to_string(),
        sink: graph.stages[sink].id().to_string(),
        classes,
        class_mode,
        splits,
    };
    let text = serde_json::to_string_pretty(&plan).map_err(|e| PlanError::Other(e.to_string()))? + "\n";
    super::part::write_synced(&dir.join(PLAN), text.as_bytes()).map_err(|e| io_err(&dir.join(PLAN), e))?;
    Ok(plan)
}

/// What a sharded `file_reader` emits: its range of the manifest, with the
/// labels and splits the plan recorded (the same values listing would give).
pub use crate::item::Listed;

pub fn read_listing(input: &ShardInput) -> Result<Vec<Listed>, String> {
    let plan = Plan::load(&input.plan_dir).map_err(|e| e.to_string())?;
    let classes: std::sync::Arc<[String]> = plan.classes.clone().into();
    let splits: Vec<std::sync::Arc<str>> = plan.splits.iter().map(|s| std::sync::Arc::from(s.as_str())).collect();
    let entries = manifest::read_range(&input.plan_dir, input.start, input.end)?;
    let at = |n: usize| input.start + n as u64;
    entries
        .into_iter()
        .enumerate()
        .map(|(n, e)| {
            let bad = |what: &str, i: u32| {
                format!(
                    "{}: entry {}: {what} index {i} out of range",
                    input.plan_dir.join(manifest::MANIFEST).display(),
                    at(n)
                )
            };
            let label = match e.label {
                Some(i) if (i as usize) < classes.len() => {
                    Some(crate::item::Label { index: i, classes: classes.clone(), mode: plan.class_mode })
                }
                Some(i) => return Err(bad("label", i)),
                None => None,
            };
            let split = match e.split {
                Some(i) => Some(splits.get(i as usize).cloned().ok_or_else(|| bad("split", i))?),
                None => None,
            };
            Ok((e.path, label, split))
        })
        .collect()
}
