//! What a trained model's folder holds, read back typed: a trainer's
//! description (`head.json`, `model.json`), a classifier whichever trainer
//! made it ([`classifier`]), and the pretrained VGG block5 and dense head a
//! convnet is fine-tuned from ([`fine_tune`]). The stages that train write
//! these folders; the ones that predict, draw heatmaps or fine-tune read
//! them here.

pub mod classifier;
pub mod fine_tune;

use std::path::Path;

use crate::stage::StageError;

/// The description a trainer writes beside its weights (`head.json`,
/// `model.json`) and the class names it lists, in label order.
pub fn read_description(path: &Path) -> Result<(serde_json::Value, Vec<String>), StageError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| StageError::fatal(format!("{}: unreadable: {e}", path.display())))?;
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| StageError::fatal(format!("{}: not JSON: {e}", path.display())))?;
    let classes: Vec<String> =
        meta["classes"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_string)).collect();
    if classes.is_empty() {
        return Err(StageError::fatal(format!("{} lists no classes", path.display())));
    }
    Ok((meta, classes))
}
