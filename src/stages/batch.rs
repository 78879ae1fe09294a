//! `batch`: groups items for one model call; the last partial batch is kept.
//! Items whose features are already known (cache hits) ride in the batch
//! too, so the source order survives to the sink.

use serde::{Deserialize, Serialize};

use crate::item::{Item, ItemKind, Payload};
use crate::stage::{
    BuildContext, Built, Emit, EpochEnd, FieldError, OptionDoc, RunSignals, Stage, StageConfig, StageError,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_size")]
    pub size: usize,
}

fn default_size() -> usize {
    20
}

impl StageConfig for BatchConfig {
    const KIND: &'static str = "batch";
    const SUMMARY: &'static str = "groups images into batches in order; the last partial batch is kept";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image, ItemKind::Features];
    const EMITS: Option<ItemKind> = Some(ItemKind::Batch);
    const OPTIONS: &'static [OptionDoc] =
        &[OptionDoc { name: "size", ty: "int", default: "20", help: "items per batch (the book's batch_size)" }];

    fn check(&self) -> Vec<FieldError> {
        if self.size == 0 { vec![FieldError::new("size", "must be at least 1")] } else { Vec::new() }
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(Batch { size: self.size, pending: Vec::with_capacity(self.size) })))
    }
}

struct Batch {
    size: usize,
    pending: Vec<Item>,
}

impl Batch {
    fn flush(&mut self, out: &mut dyn Emit) -> Result<(), StageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let items = std::mem::replace(&mut self.pending, Vec::with_capacity(self.size));
        let meta = items[0].meta.clone();
        out.emit(Item { meta, payload: Payload::Batch(items) })?;
        Ok(())
    }
}

impl Stage for Batch {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        self.pending.push(item);
        if self.pending.len() >= self.size {
            self.flush(out)?;
        }
        Ok(())
    }

    /// A batch never spans two epochs (the last one of an epoch may be short).
    fn end_epoch(&mut self, _marker: &EpochEnd, out: &mut dyn Emit) -> Result<(), StageError> {
        self.flush(out)
    }

    fn finish(&mut self, out: &mut dyn Emit, _signals: &RunSignals) -> Result<(), StageError> {
        self.flush(out)
    }
}
