//! `curves.png`: the book's two training plots side by side (training vs.
//! validation accuracy; training vs. validation loss).

use std::path::Path;

use plotters::prelude::*;

/// Text needs a TrueType font; DejaVu Sans ships with Debian (fonts-dejavu-core).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

pub(crate) fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = FONT_PATHS.iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(|| {
                format!("no DejaVuSans.ttf in {} (apt-get install fonts-dejavu-core)", FONT_PATHS.join(", "))
            })?;
            // plotters keeps a 'static reference; the font lives for the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "bad font file".to_string())
        })
        .clone()
}

/// One row per epoch: (epoch, loss, acc, val_loss, val_acc).
pub type Epoch = (usize, f32, f32, Option<f32>, Option<f32>);

/// A panel: what it plots, the training value and the validation value of an epoch.
type Panel = (&'static str, fn(&Epoch) -> f32, fn(&Epoch) -> Option<f32>);

/// The book's `smooth_curve` (listing 5.24): each point replaced by an
/// exponential moving average, `previous * factor + point * (1 - factor)`,
/// the first kept as it is.
pub fn smooth(points: impl IntoIterator<Item = f32>, factor: f32) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::new();
    for p in points {
        let s = match out.last() {
            Some(&prev) => prev * factor + p * (1.0 - factor),
            None => p,
        };
        out.push(s);
    }
    out
}

/// `curves` of the history with each of its four series smoothed (validation
/// over the epochs that have it), as the book plots fine-tuning's noisy curves.
pub fn smoothed_curves(path: &Path, history: &[Epoch], factor: f32) -> Result<(), String> {
    let loss = smooth(history.iter().map(|e| e.1), factor);
    let acc = smooth(history.iter().map(|e| e.2), factor);
    let mut val_loss = smooth(history.iter().filter_map(|e| e.3), factor).into_iter();
    let mut val_acc = smooth(history.iter().filter_map(|e| e.4), factor).into_iter();
    let smoothed: Vec<Epoch> = history
        .iter()
        .enumerate()
        .map(|(i, e)| (e.0, loss[i], acc[i], e.3.and_then(|_| val_loss.next()), e.4.and_then(|_| val_acc.next())))
        .collect();
    draw(path, &smoothed, &format!(", smoothed ({factor})"))
}

pub fn curves(path: &Path, history: &[Epoch]) -> Result<(), String> {
    draw(path, history, "")
}

fn draw(path: &Path, history: &[Epoch], note: &str) -> Result<(), String> {
    register_font()?;
    // Drawn into memory and encoded by `image`: plotters' own PNG encoder
    // would build a second, older `image` crate (and its codecs) into convflow.
    let (width, height) = (1200u32, 480u32);
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(600);
    let panels: [Panel; 2] = [("accuracy", |e| e.2, |e| e.4), ("loss", |e| e.1, |e| e.3)];
    let epochs = history.len().max(1) as f32;
    for (area, (what, train, val)) in [left, right].into_iter().zip(panels) {
        let values: Vec<f32> = history.iter().map(train).chain(history.iter().filter_map(val)).collect();
        let (lo, hi) = values.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let title = format!("Training and validation {what}{note}");
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5f32..epochs + 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(what)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
        let blue = RGBColor(31, 119, 180);
        chart
            .draw_series(history.iter().map(|e| Circle::new((e.0 as f32, train(e)), 4, blue.filled())))
            .map_err(|e| e.to_string())?
            .label(format!("Training {what}"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, blue.filled()));
        let points: Vec<(f32, f32)> = history.iter().filter_map(|e| val(e).map(|v| (e.0 as f32, v))).collect();
        if !points.is_empty() {
            chart
                .draw_series(LineSeries::new(points, blue.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(format!("Validation {what}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    drop(root);
    let picture = image::RgbImage::from_raw(width, height, pixels).ok_or("the plot's buffer has the wrong size")?;
    picture.save(path).map_err(|e| format!("{}: {e}", path.display()))
}
