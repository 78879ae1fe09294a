//! Checkpoints: a training that stops (kill -9, Ctrl-C, a machine taken
//! away) resumes where its last finished epoch left it, with the result it
//! would have had uninterrupted, bit for bit (same seed, same threads).
//!
//! After every validated epoch the trainer writes `checkpoint.safetensors`
//! into its `out_dir`: the weights, the optimizer's slots and step count,
//! the best epoch's weights (`keep_best`), the history and early stopping's
//! state. It is written beside and renamed over the old one, so a kill
//! leaves the previous checkpoint or the new one, never half of one.
//!
//! A later run of the same pipeline resumes from it when its fingerprint
//! matches: the options of the trainer and of every stage upstream. Epochs
//! already trained are skipped, their items still streaming past (decoding
//! is cheap beside a training step) so every later epoch sees the items and
//! draws it would have seen; every random draw derives from (seed, epoch).
//! A checkpoint of other options is replaced, and the log says so. The
//! fingerprint covers options, not file contents: change the images under
//! an unchanged pipeline and the training resumes on the new ones. A
//! finished training deletes its checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::EpochRecord;

pub const FILE: &str = "checkpoint.safetensors";
const FORMAT: &str = "convflow-checkpoint-1";

/// A model's training state as named tensors (weights, and optimizer
/// slots when taken with the optimizer), plus the optimizer's step count.
#[derive(Debug, Clone, Default)]
pub struct ModelState {
    pub iterations: u64,
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl ModelState {
    pub fn get(&self, name: &str) -> Result<&[f32], String> {
        self.tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| v.as_slice())
            .ok_or_else(|| format!("checkpoint lacks tensor `{name}`"))
    }
}

/// Everything a resumed training needs, as of the end of epoch `epoch`.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub fingerprint: String,
    /// The last finished (and validated) epoch, 1-based.
    pub epoch: usize,
    pub history: Vec<EpochRecord>,
    /// Best monitored score and its epoch.
    pub best: Option<(f32, usize)>,
    /// Early stopping had ended the training.
    pub stopped: bool,
    /// Training seconds of the runs so far.
    pub train_seconds: f64,
    pub model: ModelState,
    /// The best epoch's weights (`keep_best`).
    pub best_model: Option<ModelState>,
}

/// The fingerprint of a trainer's options and of the stages upstream.
pub fn fingerprint(trainer: &serde_json::Value, upstream: &[serde_json::Value]) -> String {
    let text = serde_json::json!({ "trainer": trainer, "upstream": upstream }).to_string();
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically (a temporary file, synced, then renamed).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let err = |e: String| format!("{}: {e}", path.display());
        let mut named: Vec<(String, &[usize], Vec<u8>)> = Vec::new();
        for (prefix, state) in [("model", Some(&self.model)), ("best", self.best_model.as_ref())] {
            for (name, shape, values) in state.map(|s| s.tensors.as_slice()).unwrap_or_default() {
                named.push((format!("{prefix}/{name}"), shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
            }
        }
        let views = named
            .iter()
            .map(|(n, shape, bytes)| TensorView::new(Dtype::F32, shape.to_vec(), bytes).map(|v| (n.clone(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        let json = |v: serde_json::Result<String>| v.map_err(|e| err(e.to_string()));
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("fingerprint".to_string(), self.fingerprint.clone()),
            ("epoch".to_string(), self.epoch.to_string()),
            ("iterations".to_string(), self.model.iterations.to_string()),
            ("history".to_string(), json(serde_json::to_string(&self.history))?),
            ("best".to_string(), json(serde_json::to_string(&self.best))?),
            ("stopped".to_string(), self.stopped.to_string()),
            ("train_seconds".to_string(), self.train_seconds.to_string()),
        ]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("safetensors.partial");
        let mut file = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
        file.write_all(&bytes).and_then(|_| file.sync_all()).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }

    /// The checkpoint at `path`; `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<Checkpoint>, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let err = |e: String| format!("{}: not a readable checkpoint ({e}); delete it to start afresh", path.display());
        let st = SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).map(String::as_str).ok_or_else(|| err(format!("no `{k}`")));
        if get("format")? != FORMAT {
            return Err(err(format!("format `{}`, expected `{FORMAT}`", get("format")?)));
        }
        let num = |k: &str| get(k)?.parse::<u64>().map_err(|e| err(format!("`{k}`: {e}")));
        let mut model = ModelState { iterations: num("iterations")?, tensors: Vec::new() };
        let mut best = ModelState { iterations: 0, tensors: Vec::new() };
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        for name in names {
            let t = st.tensor(&name).map_err(|e| err(e.to_string()))?;
            if t.dtype() != Dtype::F32 {
                return Err(err(format!("{name}: {:?}, expected F32", t.dtype())));
            }
            let values = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let entry = |n: &str| (n.to_string(), t.shape().to_vec(), values);
            match name.split_once('/') {
                Some(("model", n)) => model.tensors.push(entry(n)),
                Some(("best", n)) => best.tensors.push(entry(n)),
                _ => return Err(err(format!("unexpected tensor `{name}`"))),
            }
        }
        Ok(Some(Checkpoint {
            fingerprint: get("fingerprint")?.to_string(),
            epoch: num("epoch")? as usize,
            history: serde_json::from_str(get("history")?).map_err(|e| err(format!("`history`: {e}")))?,
            best: serde_json::from_str(get("best")?).map_err(|e| err(format!("`best`: {e}")))?,
            stopped: get("stopped")? == "true",
            train_seconds: get("train_seconds")?.parse().map_err(|e| err(format!("`train_seconds`: {e}")))?,
            model,
            best_model: (!best.tensors.is_empty()).then_some(best),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_reads_back_as_written_and_a_torn_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert!(Checkpoint::load(&path).unwrap().is_none());
        let record = EpochRecord { epoch: 1, loss: 0.5, acc: 0.75, val_loss: Some(0.6), val_acc: None, seconds: 1.5 };
        let state = |v: f32| ModelState {
            iterations: 7,
            tensors: vec![("conv2d/kernel".into(), vec![2, 1], vec![v, -v]), ("conv2d/bias".into(), vec![1], vec![v])],
        };
        let c = Checkpoint {
            fingerprint: fingerprint(&serde_json::json!({"seed": 1}), &[]),
            epoch: 1,
            history: vec![record],
            best: Some((0.6, 1)),
            stopped: false,
            train_seconds: 2.25,
            model: state(0.1),
            best_model: Some(state(0.2)),
        };
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap().unwrap();
        assert_eq!((back.epoch, back.best, back.stopped, back.train_seconds), (1, Some((0.6, 1)), false, 2.25));
        assert_eq!(back.fingerprint, c.fingerprint);
        assert_eq!(back.history[0].val_loss, Some(0.6));
        assert_eq!(back.model.iterations, 7);
        assert_eq!(back.model.get("conv2d/kernel").unwrap(), &[0.1, -0.1]);
        assert_eq!(back.best_model.unwrap().get("conv2d/bias").unwrap(), &[0.2]);
        assert_ne!(fingerprint(&serde_json::json!({"seed": 2}), &[]), c.fingerprint);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = Checkpoint::load(&path).unwrap_err();
        assert!(e.contains("not a readable checkpoint") && e.contains("delete it"), "{e}");
    }
}
