//! Reads a plain VGG conv base out of an ONNX file: the graph must be,
//! node for node, what tf2onnx makes of a Keras VGG cut after its last pool
//! (`models/make_vgg16_notop.py`, `models/bases.sh vgg19`):
//!
//! `Transpose(0,3,1,2)`, then `Conv 3x3 (pads 1, stride 1) -> Relu` and
//! `MaxPool 2x2 stride 2` in any order (a pool after a Relu), then
//! `Transpose(0,2,3,1)` to the graph's only output.
//!
//! Anything else (another op, an attribute that changes the arithmetic, a
//! weight that is not a float32 initializer, a branch) and the file is not
//! covered: [`read`] says why, and the caller runs the model in ONNX Runtime.
//! The weights are the file's own, so the engine can only ever compute
//! what that very file computes.
//!
//! ONNX is protobuf; this reads the few fields it needs with a minimal
//! wire-format walker rather than pulling in a protobuf stack.

use std::collections::HashMap;

/// One layer of the chain, weights as the file holds them.
#[derive(Debug, Clone)]
pub enum PlainLayer {
    /// `weight` is ONNX's `[filters, channels, 3, 3]`.
    Conv3x3Relu {
        channels: usize,
        filters: usize,
        weight: Vec<f32>,
        bias: Vec<f32>,
    },
    MaxPool2x2,
}

/// Why a file is not a plain VGG conv base (or cannot be read).
pub type NotCovered = String;

/// A protobuf field: number and value.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// Walks the fields of one message.
fn fields(mut buf: &[u8]) -> Result<Vec<(u32, Value<'_>)>, NotCovered> {
    fn varint(buf: &mut &[u8]) -> Result<u64, NotCovered> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first().ok_or("truncated protobuf varint")?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("protobuf varint over 64 bits".into())
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut buf)?),
            1 => {
                buf = buf.get(8..).ok_or("truncated protobuf fixed64")?;
                continue;
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| "protobuf length too large")?;
                let (v, rest) = (buf.get(..len).ok_or("truncated protobuf bytes")?, &buf[len..]);
                buf = rest;
                Value::Bytes(v)
            }
            5 => {
                let (v, rest) = buf.split_at_checked(4).ok_or("truncated protobuf fixed32")?;
                buf = rest;
                Value::Fixed32(u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
            }
            w => return Err(format!("protobuf wire type {w} (groups) not expected in ONNX")),
        };
        out.push((field, value));
    }
    Ok(out)
}

fn string(v: &Value<'_>) -> Result<String, NotCovered> {
    match v {
        Value::Bytes(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        _ => Err("expected a string field".into()),
    }
}

/// A repeated int64 field, packed or not.
fn push_ints(v: &Value<'_>, out: &mut Vec<i64>) -> Result<(), NotCovered> {
    match v {
        Value::Varint(x) => out.push(*x as i64),
        Value::Bytes(b) => {
            let mut b: &[u8] = b;
            while !b.is_empty() {
                let mut x = 0u64;
                let mut shift = 0;
                loop {
                    let (&c, rest) = b.split_first().ok_or("truncated packed varint")?;
                    b = rest;
                    x |= u64::from(c & 0x7f) << shift;
                    shift += 7;
                    if c & 0x80 == 0 {
                        break;
                    }
                    if shift >= 64 {
                        return Err("packed varint over 64 bits".into());
                    }
                }
                out.push(x as i64);
            }
        }
        Value::Fixed32(_) => return Err("expected an int64 field".into()),
    }
    Ok(())
}

struct Node {
    op: String,
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Attribute name -> its ints (`i` or `ints`); other kinds as `None`.
    attrs: HashMap<String, Option<Vec<i64>>>,
}

struct Tensor {
    dims: Vec<i64>,
    data_type: i64,
    data: Vec<f32>,
    external: bool,
}

fn node(buf: &[u8]) -> Result<Node, NotCovered> {
    let mut n = Node { op: String::new(), name: String::new(), inputs: vec![], outputs: vec![], attrs: HashMap::new() };
    for (f, v) in fields(buf)? {
        match f {
            1 => n.inputs.push(string(&v)?),
            2 => n.outputs.push(string(&v)?),
            3 => n.name = string(&v)?,
            4 => n.op = string(&v)?,
            7 => {
                let d = string(&v)?;
                if !d.is_empty() && d != "ai.onnx" {
                    return Err(format!("node {}: op domain {d:?}", n.name));
                }
            }
            5 => {
                let Value::Bytes(b) = v else { return Err("attribute is not a message".into()) };
                let (mut name, mut ints, mut other) = (String::new(), Vec::new(), false);
                for (af, av) in fields(b)? {
                    match af {
                        1 => name = string(&av)?,
                        3 | 8 => push_ints(&av, &mut ints)?,
                        2 | 4 | 5 | 6 | 7 | 9 | 10 | 11 => other = true,
                        _ => {}
                    }
                }
                n.attrs.insert(name, (!other).then_some(ints));
            }
            _ => {}
        }
    }
    Ok(n)
}

fn tensor(buf: &[u8]) -> Result<(String, Tensor), NotCovered> {
    let (mut name, mut t) = (String::new(), Tensor { dims: vec![], data_type: 0, data: vec![], external: false });
    for (f, v) in fields(buf)? {
        match (f, &v) {
            (1, _) => push_ints(&v, &mut t.dims)?,
            (2, Value::Varint(x)) => t.data_type = *x as i64,
            (4, Value::Fixed32(x)) => t.data.push(f32::from_bits(*x)),
            (4, Value::Bytes(b)) | (9, Value::Bytes(b)) => {
                if b.len() % 4 != 0 {
                    return Err("tensor data not a whole number of float32".into());
                }
                t.data.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
            (8, _) => name = string(&v)?,
            (13, _) => t.external = true,
            (14, Value::Varint(1)) => t.external = true,
            _ => {}
        }
    }
    Ok((name, t))
}

/// Is attribute `name` absent or exactly `want`?
fn attr_is(n: &Node, name: &str, want: &[i64]) -> bool {
    match n.attrs.get(name) {
        None => true,
        Some(Some(v)) => v == want,
        Some(None) => false,
    }
}

/// The layers of `bytes` (an ONNX model file), if it is a plain VGG conv base.
pub fn read(bytes: &[u8]) -> Result<Vec<PlainLayer>, NotCovered> {
    let graph = fields(bytes)?
        .into_iter()
        .find_map(|(f, v)| match (f, v) {
            (7, Value::Bytes(b)) => Some(b),
            _ => None,
        })
        .ok_or("no graph in the file")?;
    let (mut nodes, mut inits, mut inputs, mut outputs) = (Vec::new(), HashMap::new(), Vec::new(), Vec::new());
    for (f, v) in fields(graph)? {
        let Value::Bytes(b) = v else { continue };
        match f {
            1 => nodes.push(node(b)?),
            5 => {
                let (name, t) = tensor(b)?;
                inits.insert(name, t);
            }
            // ValueInfoProto: field 1 is the name.
            11 | 12 => {
                let name = fields(b)?.iter().find(|(f, _)| *f == 1).map(|(_, v)| string(v)).transpose()?;
                let name = name.unwrap_or_default();
                if f == 11 { inputs.push(name) } else { outputs.push(name) }
            }
            _ => {}
        }
    }
    // Initializers may be listed as inputs too (old exporters): not images.
    inputs.retain(|i| !inits.contains_key(i));
    let ([input], [output]) = (&inputs[..], &outputs[..]) else {
        return Err(format!("{} image inputs and {} outputs, not one of each", inputs.len(), outputs.len()));
    };
    let mut it = nodes.iter().peekable();
    let mut current = input.clone();
    let first = it.next().ok_or("an empty graph")?;
    if first.op != "Transpose"
        || first.inputs != [current.clone()]
        || !matches!(first.attrs.get("perm"), Some(Some(p)) if p == &[0, 3, 1, 2])
    {
        return Err(format!("first node {} ({}) is not the NHWC -> NCHW Transpose of the input", first.name, first.op));
    }
    current = first.outputs.first().cloned().ok_or("a node without output")?;
    let (mut layers, mut channels, mut used) = (Vec::new(), 3usize, 0usize);
    let chain = |n: &Node, current: &str| -> Result<(), NotCovered> {
        if n.inputs.first().map(String::as_str) != Some(current) || n.outputs.len() != 1 {
            return Err(format!("node {} ({}) does not continue the chain", n.name, n.op));
        }
        Ok(())
    };
    while let Some(n) = it.next() {
        chain(n, &current)?;
        match n.op.as_str() {
            "Conv" => {
                let ok = attr_is(n, "kernel_shape", &[3, 3])
                    && matches!(n.attrs.get("pads"), Some(Some(p)) if p == &[1, 1, 1, 1])
                    && attr_is(n, "strides", &[1, 1])
                    && attr_is(n, "dilations", &[1, 1])
                    && attr_is(n, "group", &[1])
                    && !n.attrs.contains_key("auto_pad")
                    && n.attrs
                        .keys()
                        .all(|k| ["kernel_shape", "pads", "strides", "dilations", "group"].contains(&k.as_str()));
                if !ok || n.inputs.len() != 3 {
                    return Err(format!("Conv {}: not a 3x3 conv with pads 1, stride 1, one group and a bias", n.name));
                }
                let (w, b) = match (inits.get(&n.inputs[1]), inits.get(&n.inputs[2])) {
                    (Some(w), Some(b)) => (w, b),
                    _ => return Err(format!("Conv {}: weight or bias is not an initializer", n.name)),
                };
                let filters = usize::try_from(*w.dims.first().unwrap_or(&0)).unwrap_or(0);
                let float_ok = |t: &Tensor, len: usize| t.data_type == 1 && !t.external && t.data.len() == len;
                if w.dims != [filters as i64, channels as i64, 3, 3]
                    || b.dims != [filters as i64]
                    || filters == 0
                    || !float_ok(w, filters * channels * 9)
                    || !float_ok(b, filters)
                {
                    return Err(format!(
                        "Conv {}: weight {:?} / bias {:?} are not float32 [filters, {channels}, 3, 3] / [filters] held in the file",
                        n.name, w.dims, b.dims
                    ));
                }
                let relu = it.next().ok_or_else(|| format!("Conv {} is the last node", n.name))?;
                chain(relu, &n.outputs[0])?;
                if relu.op != "Relu" || !relu.attrs.is_empty() {
                    return Err(format!("Conv {} is followed by {} ({}), not Relu", n.name, relu.name, relu.op));
                }
                used += 2;
                layers.push(PlainLayer::Conv3x3Relu {
                    channels,
                    filters,
                    weight: w.data.clone(),
                    bias: b.data.clone(),
                });
                channels = filters;
                current = relu.outputs[0].clone();
            }
            "MaxPool" => {
                let ok = matches!(n.attrs.get("kernel_shape"), Some(Some(k)) if k == &[2, 2])
                    && matches!(n.attrs.get("strides"), Some(Some(s)) if s == &[2, 2])
                    && attr_is(n, "pads", &[0, 0, 0, 0])
                    && attr_is(n, "ceil_mode", &[0])
                    && attr_is(n, "dilations", &[1, 1])
                    && attr_is(n, "storage_order", &[0])
                    && !n.attrs.contains_key("auto_pad");
                // A pool's input is a Relu's output, >= 0: what the fused
                // max of the engine relies on for nothing but speed.
                if !ok || !matches!(layers.last(), Some(PlainLayer::Conv3x3Relu { .. })) {
                    return Err(format!("MaxPool {}: not a 2x2 stride-2 pool after a conv", n.name));
                }
                layers.push(PlainLayer::MaxPool2x2);
                current = n.outputs[0].clone();
            }
            "Transpose" => {
                if !matches!(n.attrs.get("perm"), Some(Some(p)) if p == &[0, 2, 3, 1])
                    || it.peek().is_some()
                    || n.outputs[0] != *output
                {
                    return Err(format!("Transpose {}: not the last node, NCHW -> NHWC to the output", n.name));
                }
                if used != inits.len() {
                    return Err(format!("{} initializers, {used} used by the convs", inits.len()));
                }
                if !matches!(layers.first(), Some(PlainLayer::Conv3x3Relu { .. })) {
                    return Err("no conv".into());
                }
                return Ok(layers);
            }
            op => return Err(format!("node {} is a {op}, which the engine does not run", n.name)),
        }
    }
    Err("the graph does not end in the NCHW -> NHWC Transpose".into())
}
