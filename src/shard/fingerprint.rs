//! What determines a sharded run's output, as one hash: every stage's
//! options after `${param}` substitution (defaults filled in), its kind and
//! inputs, the contents of the models it loads, and convflow's version.
//! Where things live on one worker is left out (the input folder, which the
//! manifest replaces; output and cache folders; device and thread counts),
//! so workers with different local paths still agree.

use crate::graph::Graph;

/// Fields that name a model file: their bytes count, not their path.
const MODEL_FIELDS: &[&str] = &["model"];

/// The options of stage `i` as they enter the fingerprint.
pub fn stage_options(graph: &Graph, i: usize) -> Result<serde_json::Value, String> {
    let stage = &graph.stages[i];
    let mut options: serde_json::Value = serde_json::from_str(&stage.config.canonical_json())
        .map_err(|e| format!("stage `{}`: options are not JSON: {e}", stage.id()))?;
    if let Some(map) = options.as_object_mut() {
        // Options that say where or how fast, never what (the stage kind says which).
        for f in stage.info.place_options {
            map.remove(*f);
        }
        for f in MODEL_FIELDS {
            if let Some(serde_json::Value::String(p)) = map.get(*f) {
                let bytes = std::fs::read(p).map_err(|e| format!("stage `{}`: field `{f}`: {p}: {e}", stage.id()))?;
                map.insert(f.to_string(), format!("blake3:{}", blake3::hash(&bytes).to_hex()).into());
            }
        }
    }
    Ok(options)
}

/// The pipeline's part of the fingerprint (hex blake3).
pub fn pipeline(graph: &Graph) -> Result<String, String> {
    let mut stages = Vec::new();
    for (i, s) in graph.stages.iter().enumerate() {
        let inputs: Vec<&str> = s.inputs.iter().map(|&j| graph.stages[j].id()).collect();
        stages.push(serde_json::json!({
            "id": s.id(),
            "kind": s.info.kind,
            "inputs": inputs,
            "options": stage_options(graph, i)?,
        }));
    }
    let doc = serde_json::json!({ "convflow": env!("CARGO_PKG_VERSION"), "stages": stages });
    Ok(blake3::hash(doc.to_string().as_bytes()).to_hex().to_string())
}

/// The run's fingerprint: the pipeline's, the manifest's and the shard count.
pub fn run(pipeline: &str, manifest_blake3: &str, shards: u64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"convflow sharded run v1\n");
    for part in [pipeline, manifest_blake3, &shards.to_string()] {
        h.update(part.as_bytes()).update(b"\n");
    }
    h.finalize().to_hex().to_string()
}
