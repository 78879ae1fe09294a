//! `convflow._native`: what the Python package (python/convflow/) calls.
//! Thin on purpose: the graph, the stages and the runtime are the
//! library's; this adds a run on its own thread that Python waits on with
//! the GIL released (run.rs), taps turned into zero-copy numpy batches
//! (batch.rs), cutting a pipeline at a stage (pipeline.rs) and the
//! DistributedSampler order (sampler.rs).

mod batch;
mod pipeline;
mod run;
mod sampler;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

pyo3::create_exception!(
    convflow,
    PipelineError,
    PyValueError,
    "An invalid pipeline file or params: str() lists every problem with file:line:col, stage and field; .errors has them one by one."
);
pyo3::create_exception!(
    convflow,
    RunError,
    pyo3::exceptions::PyRuntimeError,
    "A run that could not start or failed, in the words of `convflow run`."
);

/// Checks the file and its params (and, with `environment`, what it points
/// at: folders, models), as `convflow validate` does. Returns the stage count.
#[pyfunction]
fn validate(py: Python<'_>, path: &str, params: Vec<(String, String)>, environment: bool) -> PyResult<usize> {
    let cfg = pipeline::load(py, path, &params)?;
    Ok(pipeline::build(py, cfg, environment)?.stages.len())
}

/// (id, kind, emits or None) of each stage, in file order, without checking
/// what the file points at.
#[pyfunction]
fn stages(
    py: Python<'_>,
    path: &str,
    params: Vec<(String, String)>,
) -> PyResult<Vec<(String, String, Option<String>)>> {
    let cfg = pipeline::load(py, path, &params)?;
    let registry = convflow::stages::builtin_registry();
    Ok(cfg
        .stages
        .iter()
        .map(|s| {
            (s.id.clone(), s.kind.clone(), registry.get(&s.kind).and_then(|k| k.emits).map(|e| e.name().to_string()))
        })
        .collect())
}

/// A stage that can be streamed: it exists and emits something.
pub(crate) fn check_emits(cfg: &convflow::config::PipelineConfig, stage: &str) -> PyResult<()> {
    let registry = convflow::stages::builtin_registry();
    let emitting: Vec<&str> = cfg
        .stages
        .iter()
        .filter(|s| registry.get(&s.kind).is_some_and(|k| k.emits.is_some()))
        .map(|s| s.id.as_str())
        .collect();
    match cfg.stages.iter().find(|s| s.id == stage) {
        None => Err(PyValueError::new_err(format!(
            "{}: no stage `{stage}`; stages that emit items: {}",
            cfg.file.display(),
            emitting.join(", ")
        ))),
        Some(s) if !emitting.contains(&stage) => Err(PyValueError::new_err(format!(
            "{}: stage `{stage}` is a `{}`, a sink: it emits nothing to stream; stages that emit items: {}",
            cfg.file.display(),
            s.kind,
            emitting.join(", ")
        ))),
        Some(_) => Ok(()),
    }
}

/// The listing the source of `stage` reads (for a Loader): each file's split
/// (None without splits), in the order positions refer to.
#[pyfunction]
fn listing(py: Python<'_>, path: &str, params: Vec<(String, String)>, stage: &str) -> PyResult<Vec<Option<String>>> {
    let mut cfg = pipeline::load(py, path, &params)?;
    check_emits(&cfg, stage)?;
    pipeline::cut_at(&mut cfg, stage).map_err(PyValueError::new_err)?;
    let graph = pipeline::build(py, cfg, true)?;
    let (_, source) =
        pipeline::file_source(&graph).map_err(|e| PyValueError::new_err(format!("stage `{stage}`: {e}")))?;
    let listed = convflow::stage::StageConfig::listing(&source).map_err(RunError::new_err)?;
    Ok(listed.into_iter().map(|(_, _, split)| split.map(|s| s.to_string())).collect())
}

/// Indices into `0..n` that `rank` of `world_size` reads in `epoch`.
#[pyfunction]
fn epoch_order(
    n: usize,
    seed: u64,
    epoch: u32,
    shuffle: bool,
    rank: usize,
    world_size: usize,
    drop_last: bool,
) -> Vec<usize> {
    sampler::epoch_order(n, seed, epoch, shuffle, rank, world_size, drop_last)
}

/// Items per rank (DistributedSampler's `num_samples`).
#[pyfunction]
fn per_rank(n: usize, world_size: usize, drop_last: bool) -> usize {
    sampler::per_rank(n, world_size, drop_last)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PipelineError", m.py().get_type::<PipelineError>())?;
    m.add("RunError", m.py().get_type::<RunError>())?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(stages, m)?)?;
    m.add_function(wrap_pyfunction!(listing, m)?)?;
    m.add_function(wrap_pyfunction!(epoch_order, m)?)?;
    m.add_function(wrap_pyfunction!(per_rank, m)?)?;
    m.add_class::<run::Run>()?;
    m.add_class::<batch::Batch>()?;
    m.add_class::<batch::Buffer>()?;
    Ok(())
}
