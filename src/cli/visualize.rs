//! `convflow visualize activations | filters`: the pictures of section 5.4
//! from the command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use image::RgbImage;

use crate::imaging::resize::{Filter, Resize};
use crate::ml::convnet::vgg16::{VGG16, Vgg};
use crate::ml::convnet::{Convnet, Shape};
use crate::ml::preprocess::Preprocess;
use crate::npy::NpyWriter;
use crate::trained::classifier::Classifier;
use crate::visualize::{activations, filters, picture};

#[derive(clap::Subcommand)]
pub enum Visualize {
    /// The feature maps each layer makes of one image (section 5.4.1): one
    /// PNG per conv and pooling layer, every channel a tile, 16 to a row.
    Activations {
        /// The image (any format `decode` reads).
        image: PathBuf,
        /// `vgg16` or `vgg19` (its conv base with ImageNet weights, caffe
        /// preprocessing) or the out_dir of a `convnet` stage (its own input
        /// size, channels and rescale).
        #[arg(long, default_value = "vgg16")]
        model: String,
        /// Folder for LAYER.png (and LAYER.npy).
        #[arg(long, default_value = "out/activations")]
        out: PathBuf,
        /// Image side for a VGG (a convnet takes its own).
        #[arg(long, default_value_t = 150)]
        size: usize,
        /// Only the first N layers (the book shows 8).
        #[arg(long)]
        layers: Option<usize>,
        /// Also write each layer's output as LAYER.npy, float32 [1, h, w, channels],
        /// and input.npy, the image as the model took it.
        #[arg(long)]
        npy: bool,
        #[command(flatten)]
        model_args: ModelArgs,
    },
    /// The input pattern each filter of a VGG16 or VGG19 layer responds to
    /// most (section 5.4.2): gradient ascent from gray noise; an 8-per-row grid PNG.
    Filters {
        /// The layer: block1_conv1 .. block5_conv3 (VGG19: .. block5_conv4).
        #[arg(long)]
        layer: String,
        /// `vgg16` or `vgg19`.
        #[arg(long, default_value = "vgg16")]
        model: String,
        /// The first N filters (the book: 64).
        #[arg(long, default_value_t = 64)]
        filters: usize,
        /// Image side (the book: 150).
        #[arg(long, default_value_t = 150)]
        size: usize,
        /// Ascent steps (the book: 40).
        #[arg(long, default_value_t = 40)]
        steps: usize,
        /// Step size (the book: 1).
        #[arg(long, default_value_t = 1.0)]
        step: f32,
        /// Seed of the starting noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The PNG (default out/filters/LAYER.png); beside it LAYER.csv,
        /// each filter's mean activation at every step.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the patterns as LAYER.npy, float32 [filters, size, size, 3] (the model's BGR input).
        #[arg(long)]
        npy: bool,
        #[command(flatten)]
        model_args: ModelArgs,
    },
}

/// What both commands run a VGG with.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// The VGG's conv weights (default: models/vgg16_convs.safetensors, which
    /// models/setup.sh writes; models/vgg19_convs.safetensors, models/bases.sh vgg19).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Math threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

impl ModelArgs {
    fn threads(&self) -> usize {
        crate::config::threads(self.threads, 1)
    }

    fn weights(&self, vgg: &Vgg) -> PathBuf {
        self.weights.clone().unwrap_or_else(|| vgg.weights.into())
    }
}

/// The VGG `--model` names, or an error naming the choices.
fn vgg(model: &str) -> anyhow::Result<Vgg> {
    Vgg::named(model).with_context(|| format!("--model {model}: `vgg16` or `vgg19`"))
}

/// Runs one `visualize` command; prints what it wrote unless `quiet`.
pub fn run(what: Visualize, quiet: bool) -> anyhow::Result<()> {
    match what {
        Visualize::Activations { image, model, out, size, layers, npy, model_args } => {
            let (mut net, x) = activation_input(&image, &model, size, &model_args)?;
            let maps = activations::layer_maps(&mut net, &x, layers)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            if npy {
                // The image as the model took it (resized, preprocessed), to check the maps against.
                let mut w = NpyWriter::create(&out.join("input.npy"), &net.input_shape())?;
                w.push(&x)?;
                w.finish()?;
            }
            for (i, m) in maps.iter().enumerate() {
                let png = out.join(format!("{i:02}_{}.png", m.name));
                picture::save(&activations::layer_picture(m).map_err(anyhow::Error::msg)?, &png)
                    .map_err(anyhow::Error::msg)?;
                if npy {
                    let path = out.join(format!("{i:02}_{}.npy", m.name));
                    let mut w = NpyWriter::create(&path, &m.shape)?;
                    w.push(&m.values)?;
                    w.finish()?;
                }
                if !quiet {
                    println!("{}: {} {:?}", png.display(), m.name, m.shape);
                }
            }
            Ok(())
        }
        Visualize::Filters { layer, model, filters: n, size, steps, step, seed, out, npy, model_args } => {
            let vgg = vgg(&model)?;
            let layers = vgg.layers();
            let index = layers.iter().position(|l| *l == layer && l.contains("_conv")).with_context(|| {
                let convs: Vec<&str> = layers.iter().filter(|l| l.contains("_conv")).map(String::as_str).collect();
                format!("--layer {layer}: not one of {}'s convs ({})", vgg.name, convs.join(", "))
            })?;
            let mut net = vgg.conv_base([size, size], &layer, &model_args.weights(&vgg), model_args.threads())?;
            let Shape::Map([_, _, channels]) = net.layers()[index].output else { bail!("{layer} has no map") };
            if n == 0 || n > channels {
                bail!("--filters {n}: {layer} has {channels} filters");
            }
            let ascent = filters::Ascent { size, steps, step, seed, ..Default::default() };
            let which: Vec<usize> = (0..n).collect();
            let started = std::time::Instant::now();
            let patterns = filters::patterns(&mut net, index, &which, &ascent)?;
            let png = out.unwrap_or_else(|| PathBuf::from(format!("out/filters/{layer}.png")));
            let title = format!("{layer}: filters 0-{} ({steps} steps from gray noise)", n - 1);
            picture::save(&filters::grid(&patterns, size, &title).map_err(anyhow::Error::msg)?, &png)
                .map_err(anyhow::Error::msg)?;
            let mut csv = String::from("filter,step,mean_activation\n");
            for p in &patterns {
                for (s, m) in p.trace.iter().enumerate() {
                    csv.push_str(&format!("{},{s},{m}\n", p.filter));
                }
            }
            std::fs::write(png.with_extension("csv"), csv)?;
            if npy {
                let mut w = NpyWriter::create(&png.with_extension("npy"), &[size, size, 3])?;
                for p in &patterns {
                    w.push(&p.image)?;
                }
                w.finish()?;
            }
            if !quiet {
                let rose = patterns.iter().filter(|p| p.trace.last() > p.trace.first()).count();
                println!(
                    "{}: {n} patterns of {layer}, {steps} steps, {:.1} s; mean activation rose for {rose} of {n}",
                    png.display(),
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
    }
}

/// The model `activations` runs and the image as it takes it.
fn activation_input(image: &Path, model: &str, size: usize, args: &ModelArgs) -> anyhow::Result<(Convnet, Vec<f32>)> {
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let img = crate::imaging::decode::decode_image(&bytes, u64::MAX)
        .map_err(|e| anyhow::anyhow!("{}: {e}", image.display()))?;
    if let Some(vgg) = Vgg::named(model) {
        let net = vgg.conv_base([size, size], "block5_pool", &args.weights(&vgg), args.threads())?;
        let img = resized(img, size, size, Filter::default())?;
        let mut x = Vec::new();
        Preprocess::Caffe.extend(&img, &mut x);
        return Ok((net, x));
    }
    let trained = Classifier::describe(Path::new(model)).map_err(|e| {
        anyhow::anyhow!("--model {model}: not `vgg16` or `vgg19`, nor a trained classifier's folder: {e}")
    })?;
    let (Some(input), None) = (trained.input, trained.base) else {
        bail!("--model {model}: it takes VGG16's block4 maps or features, not images; use --model vgg16");
    };
    let net = trained.build(input, &args.weights(&VGG16), args.threads()).map_err(anyhow::Error::msg)?;
    let [h, w, c] = input;
    let img = resized(img, h, w, trained.resize_filter)?;
    let rescale = trained.rescale;
    let x: Vec<f32> = if c == 1 {
        crate::imaging::decode::to_gray(&img).as_raw().iter().map(|&v| f32::from(v) * rescale).collect()
    } else {
        img.as_raw().iter().map(|&v| f32::from(v) * rescale).collect()
    };
    Ok((net, x))
}

/// Resized as the `resize` stage does (VGG16: its default filter, as the pipelines use).
fn resized(img: RgbImage, h: usize, w: usize, filter: Filter) -> anyhow::Result<RgbImage> {
    Resize::new(h as u32, w as u32, filter).apply(img).map_err(anyhow::Error::msg)
}
