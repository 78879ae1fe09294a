//! Items that a tapped stage emitted, assembled into one batch whose arrays
//! numpy takes over without a copy.

use convflow::item::{ClassMode, Item, Payload};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// The pixels or features of one batch, in one allocation.
enum Data {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// A Rust-owned array that numpy reads through `__array_interface__`:
/// `numpy.asarray(buffer)` is a view on this allocation (writable), and
/// keeps the buffer alive as its `base`. No copy, and no numpy C API, which
/// the abi3 wheel could not rely on.
#[pyclass(module = "convflow._native", frozen)]
pub struct Buffer {
    data: Data,
    shape: Vec<usize>,
    /// Taken once from the owned allocation: numpy writes through it while
    /// Rust never reads `data` again.
    ptr: usize,
}

impl Buffer {
    fn new(mut data: Data, shape: Vec<usize>) -> Buffer {
        let ptr = match &mut data {
            Data::U8(v) => v.as_mut_ptr() as usize,
            Data::F32(v) => v.as_mut_ptr() as usize,
        };
        Buffer { data, shape, ptr }
    }
}

#[pymethods]
impl Buffer {
    /// The address of the allocation (what the zero-copy test compares).
    #[getter]
    fn address(&self) -> usize {
        self.ptr
    }

    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("version", 3)?;
        d.set_item("shape", PyTuple::new(py, &self.shape)?)?;
        let typestr = match self.data {
            Data::U8(_) => "|u1",
            Data::F32(_) => "<f4",
        };
        d.set_item("typestr", typestr)?;
        d.set_item("data", (self.ptr, false))?;
        Ok(d)
    }
}

/// One batch: `x` and `y` as buffers, `paths` and `splits` per item.
#[pyclass(module = "convflow._native")]
pub struct Batch {
    #[pyo3(get)]
    x: Py<Buffer>,
    #[pyo3(get)]
    y: Option<Py<Buffer>>,
    #[pyo3(get)]
    paths: Vec<String>,
    #[pyo3(get)]
    splits: Vec<Option<String>>,
    #[pyo3(get)]
    epoch: u32,
}

/// Images or features, flattened out of any `batch` items.
pub fn members(item: Item, into: &mut Vec<Item>) {
    match item.payload {
        Payload::Batch(items) => into.extend(items),
        _ => into.push(item),
    }
}

fn shape_of(item: &Item) -> Result<(Vec<usize>, bool), String> {
    Ok(match &item.payload {
        Payload::Image(img) => (vec![img.height() as usize, img.width() as usize, 3], false),
        Payload::Gray(img) => (vec![img.height() as usize, img.width() as usize, 1], false),
        Payload::Features(f) => (f.shape.clone(), true),
        Payload::Bytes(_) => {
            return Err("emits encoded file bytes, not arrays: stream or load a stage after `decode`".into());
        }
        Payload::Batch(_) => return Err("internal: a batch inside a batch".into()),
    })
}

/// One contiguous array of every item (all of one shape), their labels as
/// `labels.npy` holds them (binary: [N] 0/1; categorical: [N, classes]), paths
/// escaped as `paths.txt` writes them.
pub fn assemble(py: Python<'_>, stage: &str, items: Vec<Item>) -> PyResult<Batch> {
    let err = |m: String| pyo3::exceptions::PyValueError::new_err(format!("stage `{stage}` {m}"));
    let first = items.first().ok_or_else(|| err("emitted an empty batch".into()))?;
    let (shape, float) = shape_of(first).map_err(err)?;
    let per: usize = shape.iter().product();
    let mut data = if float {
        Data::F32(Vec::with_capacity(per * items.len()))
    } else {
        Data::U8(Vec::with_capacity(per * items.len()))
    };
    for item in &items {
        let (s, f) = shape_of(item).map_err(err)?;
        if s != shape || f != float {
            let what = |s: &[usize], f: bool| format!("{} {:?}", if f { "features" } else { "an image" }, s);
            return Err(err(format!(
                "emitted items of different shapes in one batch ({} at {}, {} first): resize them to one size upstream",
                what(&s, f),
                convflow::names::escape_path(&item.meta.path),
                what(&shape, float)
            )));
        }
        match (&mut data, &item.payload) {
            (Data::U8(v), Payload::Image(img)) => v.extend_from_slice(img.as_raw()),
            (Data::U8(v), Payload::Gray(img)) => v.extend_from_slice(img.as_raw()),
            (Data::F32(v), Payload::Features(f)) => v.extend_from_slice(&f.data),
            _ => return Err(err("internal: payload and array type disagree".into())),
        }
    }
    let mut x_shape = vec![items.len()];
    x_shape.extend(shape);
    let y = labels(&items).map(|(v, s)| Py::new(py, Buffer::new(Data::F32(v), s))).transpose()?;
    Ok(Batch {
        x: Py::new(py, Buffer::new(data, x_shape))?,
        y,
        paths: items.iter().map(|i| convflow::names::escape_path(&i.meta.path)).collect(),
        splits: items.iter().map(|i| i.meta.split.as_deref().map(str::to_string)).collect(),
        epoch: items[0].meta.epoch,
    })
}

fn labels(items: &[Item]) -> Option<(Vec<f32>, Vec<usize>)> {
    let first = items[0].meta.label.as_ref()?;
    let mut out = Vec::new();
    for item in items {
        let l = item.meta.label.as_ref()?;
        match l.mode {
            ClassMode::Binary => out.push(l.index as f32),
            ClassMode::Categorical => {
                out.extend((0..l.classes.len()).map(|c| if c == l.index as usize { 1.0 } else { 0.0 }))
            }
            ClassMode::None => return None,
        }
    }
    let shape = match first.mode {
        ClassMode::Categorical => vec![items.len(), first.classes.len()],
        _ => vec![items.len()],
    };
    Some((out, shape))
}
