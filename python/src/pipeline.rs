//! A pipeline file as the Python `Pipeline` sees it: loaded with its params,
//! validated, described, and cut down to what one stage needs.

use std::collections::HashSet;
use std::path::Path;

use convflow::config::{self, ConfigErrors, PipelineConfig};
use convflow::graph::Graph;
use convflow::stages::file_reader::FileReaderConfig;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::PipelineError;

/// The Python exception for an invalid file: the CLI's text (every
/// problem with file:line:col, stage and field), and each as a dict.
pub fn invalid(py: Python<'_>, e: &ConfigErrors) -> PyErr {
    let err = PipelineError::new_err(e.to_string());
    let list: Vec<Bound<'_, PyDict>> =
        e.0.iter()
            .map(|c| {
                let d = PyDict::new(py);
                let _ = d.set_item("file", c.file.display().to_string());
                let _ = d.set_item("line", c.pos.line);
                let _ = d.set_item("col", c.pos.col);
                let _ = d.set_item("stage", c.stage.clone());
                let _ = d.set_item("field", c.field.clone());
                let _ = d.set_item("message", c.message.clone());
                d
            })
            .collect();
    let _ = err.value(py).setattr("errors", list);
    err
}

pub fn load(py: Python<'_>, path: &str, params: &[(String, String)]) -> PyResult<PipelineConfig> {
    config::load(Path::new(path), params).map_err(|e| invalid(py, &e))
}

pub fn build(py: Python<'_>, cfg: PipelineConfig, environment: bool) -> PyResult<Graph> {
    let registry = convflow::stages::builtin_registry();
    Graph::build_checked(cfg, &registry, environment).map_err(|e| invalid(py, &e))
}

/// Keeps `stage` and what feeds it, nothing after it: streaming a stage
/// neither trains nor writes, and needs no model that only later stages use.
/// No report either (the caller sees the items themselves).
pub fn cut_at(cfg: &mut PipelineConfig, stage: &str) -> Result<(), String> {
    let ids: Vec<&str> = cfg.stages.iter().map(|s| s.id.as_str()).collect();
    if !ids.contains(&stage) {
        return Err(format!("{}: no stage `{stage}`; its stages: {}", cfg.file.display(), ids.join(", ")));
    }
    let mut keep: HashSet<String> = HashSet::new();
    let mut todo = vec![stage.to_string()];
    while let Some(id) = todo.pop() {
        if keep.insert(id.clone())
            && let Some(s) = cfg.stages.iter().find(|s| s.id == id)
        {
            todo.extend(s.inputs.iter().map(|(i, _)| i.clone()));
        }
    }
    cfg.stages.retain(|s| keep.contains(&s.id));
    cfg.report = None;
    Ok(())
}

/// The one source of a cut graph, which must be a `file_reader` (what a
/// loader can sample), as its typed config.
pub fn file_source(graph: &Graph) -> Result<(usize, FileReaderConfig), String> {
    let sources: Vec<usize> = (0..graph.stages.len()).filter(|&i| graph.stages[i].info.is_source()).collect();
    let [i] = sources[..] else {
        let names: Vec<&str> = sources.iter().map(|&i| graph.stages[i].id()).collect();
        return Err(format!("a Loader reads one source; this stage is fed by {} ({})", names.len(), names.join(", ")));
    };
    let s = &graph.stages[i];
    if s.info.kind != "file_reader" {
        return Err(format!(
            "a Loader samples the files of a `file_reader`; source `{}` is a `{}`",
            s.id(),
            s.info.kind
        ));
    }
    let cfg = serde_json::from_str(&s.config.canonical_json())
        .map_err(|e| format!("internal: stage `{}`'s options do not read back: {e}", s.id()))?;
    Ok((i, cfg))
}
