//! A trained convnet as one safetensors file: each tensor under its Keras
//! name and shape (`conv2d/kernel` `[3, 3, 1, 32]`, ...), the input shape
//! and layer list in the metadata, so the file alone rebuilds the model.

use std::collections::HashMap;
use std::path::Path;

use super::{Convnet, ConvnetError, LayerSpec};

impl Convnet {
    pub fn save_safetensors(&self, path: &Path) -> Result<(), ConvnetError> {
        let file_err = |m: String| ConvnetError::File { path: path.display().to_string(), message: m };
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors()
            .into_iter()
            .map(|(name, shape, v)| (name, shape, v.iter().flat_map(|w| w.to_le_bytes()).collect()))
            .collect();
        let mut views = Vec::new();
        for (name, shape, bytes) in &tensors {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|e| file_err(e.to_string()))?;
            views.push((name.clone(), view));
        }
        let specs: Vec<LayerSpec> = self.layers().iter().map(|l| l.spec).collect();
        let meta = HashMap::from([
            ("format".to_string(), "convflow-convnet".to_string()),
            ("input_shape".to_string(), serde_json::to_string(&self.input_shape()).unwrap_or_default()),
            ("layers".to_string(), serde_json::to_string(&specs).map_err(|e| file_err(e.to_string()))?),
        ]);
        safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| file_err(e.to_string()))
    }

    /// Reads a model written by [`Convnet::save_safetensors`].
    pub fn load_safetensors(path: &Path, threads: usize) -> Result<Convnet, ConvnetError> {
        let file_err = |m: String| ConvnetError::File { path: path.display().to_string(), message: m };
        let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(e.to_string()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| file_err(e.to_string()))?;
        let info = meta.metadata().as_ref().ok_or_else(|| file_err("no metadata: not a convflow convnet".into()))?;
        let get = |k: &str| info.get(k).ok_or_else(|| file_err(format!("metadata lacks `{k}`")));
        let input: [usize; 3] =
            serde_json::from_str(get("input_shape")?).map_err(|e| file_err(format!("bad `input_shape`: {e}")))?;
        let specs: Vec<LayerSpec> =
            serde_json::from_str(get("layers")?).map_err(|e| file_err(format!("bad `layers`: {e}")))?;
        let mut model = Convnet::new(input, &specs, 0, threads)?;
        let wanted: Vec<(String, Vec<usize>)> = model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
        for (name, shape) in wanted {
            let t = st.tensor(&name).map_err(|e| file_err(e.to_string()))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                return Err(file_err(format!("{name}: expected F32 {shape:?}, found {:?} {:?}", t.dtype(), t.shape())));
            }
            let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            model.set_tensor(&name, &v)?;
        }
        Ok(model)
    }
}
