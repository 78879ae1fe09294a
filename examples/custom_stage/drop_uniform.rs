//! A user's own stage: drops near-uniform images (blank frames, lens caps,
//! solid placeholders) before they cost a model call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use convflow::item::{Item, ItemKind, Payload};
use convflow::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, Stage, StageConfig, StageError};
use serde::{Deserialize, Serialize};

/// The options as they appear in YAML; unknown fields are errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropUniformConfig {
    /// Images whose pixel standard deviation (0..255 scale) is below this go.
    #[serde(default = "default_min_std")]
    pub min_std: f32,
}

fn default_min_std() -> f32 {
    4.0
}

impl StageConfig for DropUniformConfig {
    const KIND: &'static str = "drop_uniform";
    const SUMMARY: &'static str = "drops near-uniform images (blank frames, placeholders)";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] =
        &[OptionDoc { name: "min_std", ty: "float", default: "4.0", help: "minimum pixel standard deviation kept" }];
    // Stateless per item, so `workers: N` may run copies side by side.
    const PARALLEL: bool = true;

    fn check(&self) -> Vec<FieldError> {
        if self.min_std < 0.0 { vec![FieldError::new("min_std", "must be >= 0")] } else { Vec::new() }
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(DropUniform { min_std: self.min_std, dropped: Arc::new(AtomicU64::new(0)) })))
    }
}

struct DropUniform {
    min_std: f32,
    dropped: Arc<AtomicU64>,
}

impl Stage for DropUniform {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        let Payload::Image(img) = &item.payload else {
            return Err(StageError::fatal("expected an image"));
        };
        let px = img.as_raw();
        let n = px.len().max(1) as f64;
        let mean = px.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = px.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        if var.sqrt() < self.min_std as f64 {
            // Dropped on purpose: counted (items in - items out in the report).
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        out.emit(item)?;
        Ok(())
    }

    fn summary(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "dropped_uniform": self.dropped.load(Ordering::Relaxed) }))
    }
}
