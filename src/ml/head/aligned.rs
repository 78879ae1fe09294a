//! Float buffers that start on a cache line, for the hot loops' vector reads.

/// A cache line of floats: the unit of [`AlignedVec`].
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line([f32; 16]);

/// Floats starting on a cache line. The hot loops read 32-byte vectors;
/// from a plain `Vec` every other one would straddle two lines.
#[derive(Debug, Clone, Default)]
pub(super) struct AlignedVec {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedVec {
    pub(super) fn zeros(len: usize) -> AlignedVec {
        AlignedVec { lines: vec![Line([0.0; 16]); len.div_ceil(16)], len }
    }
}

impl std::ops::Deref for AlignedVec {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]` with no padding, and
        // `lines` holds at least `len` floats, all initialized.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedVec {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}
