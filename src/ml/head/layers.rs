//! The head's layers and the column-panel layout of a Dense kernel.

use super::TILE;
use super::aligned::AlignedVec;
use crate::ml::activation::Activation;

#[derive(Debug, Clone)]
pub(super) struct Dense {
    pub(super) fan_in: usize,
    pub(super) units: usize,
    pub(super) activation: Activation,
    /// `[fan_in, units]` stored as column panels (see [`Panel`]).
    pub(super) kernel: AlignedVec,
    pub(super) bias: Vec<f32>,
}

impl Dense {
    pub(super) fn panels(&self) -> impl Iterator<Item = Panel> + use<> {
        panels(self.units)
    }

    /// The kernel as Keras stores it: `[fan_in, units]` row-major.
    pub(super) fn kernel_compact(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.fan_in * self.units];
        for p in self.panels() {
            for (k, row) in self.kernel[p.range(self.fan_in)].chunks_exact(p.width).enumerate() {
                out[k * self.units + p.c0..][..p.width].copy_from_slice(row);
            }
        }
        out
    }

    /// Sets the kernel from `[fan_in, units]` row-major.
    pub(super) fn set_kernel(&mut self, kernel: &[f32]) {
        for p in self.panels() {
            for (k, row) in self.kernel[p.range(self.fan_in)].chunks_exact_mut(p.width).enumerate() {
                row.copy_from_slice(&kernel[k * self.units + p.c0..][..p.width]);
            }
        }
    }
}

/// Columns `c0..c0 + width` of a kernel, stored together as `[fan_in, width]`
/// row-major from float `c0 * fan_in` on. Panels are [`TILE`] columns wide
/// (the last one may be narrower): a forward or update pass over one panel
/// reads it front to back, which the hardware prefetchers follow, where the
/// rows of a plain `[fan_in, units]` kernel would be visited a tile at a time
/// with a stride. A panel of a 256-unit layer is 64 floats a row, 256 bytes:
/// whole cache lines.
#[derive(Debug, Clone, Copy)]
pub(super) struct Panel {
    pub(super) c0: usize,
    pub(super) width: usize,
}

impl Panel {
    pub(super) fn range(&self, fan_in: usize) -> std::ops::Range<usize> {
        self.c0 * fan_in..(self.c0 + self.width) * fan_in
    }
}

pub(super) fn panels(units: usize) -> impl Iterator<Item = Panel> {
    (0..units).step_by(TILE).map(move |c0| Panel { c0, width: TILE.min(units - c0) })
}

#[derive(Debug, Clone)]
pub(super) enum Layer {
    Dense(Dense),
    Dropout(f32),
}
