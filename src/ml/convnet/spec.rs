//! The layer list as a pipeline file writes it, in Keras's names and
//! meanings, and the shapes it implies: what `convflow validate` checks and
//! `convflow summary` prints, before any weight exists.

use serde::{Deserialize, Serialize};

use super::ConvnetError;
use super::conv2d::{ConvGeometry, Padding};
use super::pooling::PoolGeometry;
use crate::ml::activation::Activation;
use crate::ml::loss::LossKind;

/// `3` or `[3, 3]`, as Keras takes `kernel_size`, `strides` and `pool_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a size: one number, or [height, width]")]
pub enum Pair {
    One(usize),
    Two([usize; 2]),
}

impl Pair {
    pub fn get(self) -> [usize; 2] {
        match self {
            Pair::One(n) => [n, n],
            Pair::Two(p) => p,
        }
    }
}

fn one() -> Pair {
    Pair::One(1)
}
fn two() -> Pair {
    Pair::One(2)
}
fn linear() -> Activation {
    Activation::Linear
}

/// One layer: `{kind: conv2d, filters: 32, kernel_size: 3, activation: relu}`,
/// `{kind: max_pooling2d}`, `{kind: flatten}`, `{kind: dropout, rate: 0.5}`,
/// `{kind: dense, units: 1, activation: sigmoid}`. Defaults are Keras's
/// (strides 1, `valid`, no activation, pool 2 with strides = pool).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    Conv2d {
        filters: usize,
        kernel_size: Pair,
        #[serde(default = "one")]
        strides: Pair,
        #[serde(default)]
        padding: Padding,
        #[serde(default = "linear")]
        activation: Activation,
    },
    #[serde(rename = "max_pooling2d")]
    MaxPooling2d {
        #[serde(default = "two")]
        pool_size: Pair,
        /// Default: `pool_size`.
        #[serde(default)]
        strides: Option<Pair>,
    },
    Flatten,
    Dropout {
        rate: f32,
    },
    Dense {
        units: usize,
        #[serde(default = "linear")]
        activation: Activation,
    },
}

/// A dense head's layer as the same Keras layer here.
impl From<crate::ml::head::LayerSpec> for LayerSpec {
    fn from(l: crate::ml::head::LayerSpec) -> LayerSpec {
        match l {
            crate::ml::head::LayerSpec::Dense { units, activation } => LayerSpec::Dense { units, activation },
            crate::ml::head::LayerSpec::Dropout { rate } => LayerSpec::Dropout { rate },
        }
    }
}

impl LayerSpec {
    /// The Keras class name, for summaries.
    pub fn keras_name(&self) -> &'static str {
        match self {
            LayerSpec::Conv2d { .. } => "conv2d",
            LayerSpec::MaxPooling2d { .. } => "max_pooling2d",
            LayerSpec::Flatten => "flatten",
            LayerSpec::Dropout { .. } => "dropout",
            LayerSpec::Dense { .. } => "dense",
        }
    }
}

/// A tensor's shape per image: a feature map or a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Map([usize; 3]),
    Flat(usize),
}

impl Shape {
    pub fn len(&self) -> usize {
        match *self {
            Shape::Map([h, w, c]) => h * w * c,
            Shape::Flat(d) => d,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As Keras prints it: `(None, 26, 26, 32)`.
    pub fn keras(&self) -> String {
        match *self {
            Shape::Map([h, w, c]) => format!("(None, {h}, {w}, {c})"),
            Shape::Flat(d) => format!("(None, {d})"),
        }
    }
}

/// One layer resolved against its input: geometry, output shape, parameters.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Keras's layer name: `conv2d`, `conv2d_1`, ...
    pub name: String,
    pub spec: LayerSpec,
    pub input: Shape,
    pub output: Shape,
    pub params: usize,
    pub conv: Option<ConvGeometry>,
    pub pool: Option<PoolGeometry>,
}

/// Resolves every layer from the input shape and says which loss the last
/// layer implies; the first layer that cannot be built is the error, by index.
pub fn resolve(input: [usize; 3], specs: &[LayerSpec]) -> Result<(Vec<Resolved>, LossKind), ConvnetError> {
    if input.contains(&0) {
        return Err(ConvnetError::Spec(format!("input shape {input:?} has a zero dimension")));
    }
    resolve_from(Shape::Map(input), specs)
}

/// [`resolve`] from any input shape: a vector for a dense stack.
pub fn resolve_from(input: Shape, specs: &[LayerSpec]) -> Result<(Vec<Resolved>, LossKind), ConvnetError> {
    let layers = resolve_layers(input, specs)?;
    let loss = match specs.last() {
        Some(LayerSpec::Dense { activation: Activation::Sigmoid, .. }) => LossKind::BinaryCrossentropy,
        Some(LayerSpec::Dense { activation: Activation::Softmax, .. }) => LossKind::CategoricalCrossentropy,
        _ => {
            return Err(ConvnetError::Spec(
                "the last layer must be dense with activation sigmoid (binary cross-entropy) or softmax \
                 (categorical cross-entropy)"
                    .into(),
            ));
        }
    };
    Ok((layers, loss))
}

/// Every layer's shapes and name, with no loss asked of the last one: a
/// conv base (VGG16's, for the visualisations) ends in a conv or a pool.
pub fn resolve_layers(input: Shape, specs: &[LayerSpec]) -> Result<Vec<Resolved>, ConvnetError> {
    let bad = |i: usize, msg: String| ConvnetError::Layer { index: i, message: msg };
    if input.is_empty() {
        return Err(ConvnetError::Spec(format!("input shape {} is empty", input.keras())));
    }
    let mut shape = input;
    let mut out = Vec::with_capacity(specs.len());
    let mut counts: std::collections::HashMap<&str, usize> = Default::default();
    for (i, spec) in specs.iter().enumerate() {
        let last = i + 1 == specs.len();
        let (mut conv, mut pool) = (None, None);
        let (output, params) = match *spec {
            LayerSpec::Conv2d { filters, kernel_size, strides, padding, activation } => {
                let Shape::Map(m) = shape else {
                    return Err(bad(i, format!("conv2d needs a feature map, gets a vector {}", shape.keras())));
                };
                check_hidden_activation(i, activation, last)?;
                let g = ConvGeometry::new(m, kernel_size.get(), strides.get(), padding, filters).ok_or_else(|| {
                    bad(
                        i,
                        format!(
                            "conv2d of kernel {:?}, strides {:?}, {padding:?} padding, {filters} filters cannot be applied to {}",
                            kernel_size.get(),
                            strides.get(),
                            shape.keras()
                        ),
                    )
                })?;
                conv = Some(g);
                (Shape::Map([g.out_h, g.out_w, filters]), g.patch() * filters + filters)
            }
            LayerSpec::MaxPooling2d { pool_size, strides } => {
                let Shape::Map(m) = shape else {
                    return Err(bad(i, format!("max_pooling2d needs a feature map, gets a vector {}", shape.keras())));
                };
                let p = pool_size.get();
                let g = PoolGeometry::new(m, p, strides.unwrap_or(pool_size).get()).ok_or_else(|| {
                    bad(i, format!("max_pooling2d of pool_size {p:?} cannot pool a {} map", shape.keras()))
                })?;
                pool = Some(g);
                (Shape::Map([g.out_h, g.out_w, m[2]]), 0)
            }
            LayerSpec::Flatten => (Shape::Flat(shape.len()), 0),
            LayerSpec::Dropout { rate } => {
                if !(0.0..1.0).contains(&rate) {
                    return Err(bad(i, format!("dropout rate must be in [0, 1), got {rate}")));
                }
                (shape, 0)
            }
            LayerSpec::Dense { units, activation } => {
                let Shape::Flat(d) = shape else {
                    return Err(bad(
                        i,
                        format!("dense needs a vector, gets a feature map {}: put a flatten before it", shape.keras()),
                    ));
                };
                if units == 0 {
                    return Err(bad(i, "dense needs at least 1 unit".into()));
                }
                check_hidden_activation(i, activation, last)?;
                (Shape::Flat(units), d * units + units)
            }
        };
        let base = spec.keras_name();
        let n = counts.entry(base).or_default();
        let name = if *n == 0 { base.to_string() } else { format!("{base}_{n}") };
        *n += 1;
        out.push(Resolved { name, spec: *spec, input: shape, output, params, conv, pool });
        shape = output;
    }
    Ok(out)
}

fn check_hidden_activation(i: usize, a: Activation, last: bool) -> Result<(), ConvnetError> {
    if !last && a == Activation::Softmax {
        return Err(ConvnetError::Layer { index: i, message: "softmax only on the last layer".into() });
    }
    Ok(())
}

/// The text of Keras's `model.summary()`: layer (type), output shape, params, totals.
pub fn summary(title: &str, input: [usize; 3], layers: &[Resolved]) -> String {
    summary_from(title, Shape::Map(input), layers)
}

/// [`summary`] of a stack on any input shape.
pub fn summary_from(title: &str, input: Shape, layers: &[Resolved]) -> String {
    let type_name = |s: &LayerSpec| match s {
        LayerSpec::Conv2d { .. } => "Conv2D",
        LayerSpec::MaxPooling2d { .. } => "MaxPooling2D",
        LayerSpec::Flatten => "Flatten",
        LayerSpec::Dropout { .. } => "Dropout",
        LayerSpec::Dense { .. } => "Dense",
    };
    let rule = "-".repeat(72);
    let mut s = format!("Model: \"{title}\" (input {})\n{rule}\n", input.keras());
    s.push_str(&format!("{:<34}{:<24}{:>14}\n{}\n", "Layer (type)", "Output Shape", "Param #", "=".repeat(72)));
    for l in layers {
        s.push_str(&format!(
            "{:<34}{:<24}{:>14}\n",
            format!("{} ({})", l.name, type_name(&l.spec)),
            l.output.keras(),
            thousands(l.params)
        ));
    }
    let total: usize = layers.iter().map(|l| l.params).sum();
    s.push_str(&format!(
        "{}\nTotal params: {}\nTrainable params: {}\nNon-trainable params: 0\n{rule}\n",
        "=".repeat(72),
        thousands(total),
        thousands(total)
    ));
    s
}

/// `3453121` -> `3,453,121`, as Keras prints counts.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
