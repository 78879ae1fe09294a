//! `views`: emits each image as it is and mirrored, as fixed views of one
//! image (`meta.view`: 0 as it is, 1 left-right, 2 upside down, 3 both).
//! In front of a model on the validation/test branch this is test-time
//! augmentation: `dense_head` and `head_predict` average the predicted
//! probabilities over the views of an image. Each view has its own cache
//! key, so the mirrored features are computed once.

use image::imageops::{flip_horizontal, flip_vertical};
use image::{ImageBuffer, Pixel};
use serde::{Deserialize, Serialize};

use crate::facts::Facts;
use crate::item::{Item, ItemKind, Payload};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, Stage, StageConfig, StageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewsConfig {
    /// Add the left-right mirror image (the book's `horizontal_flip`).
    #[serde(default = "super::yes")]
    pub horizontal_flip: bool,
    /// Add the upside-down image (and, with `horizontal_flip`, both).
    #[serde(default)]
    pub vertical_flip: bool,
}

impl StageConfig for ViewsConfig {
    const KIND: &'static str = "views";
    const SUMMARY: &'static str =
        "emits each image and its mirror images as views of it (test-time augmentation: predictions are averaged)";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc { name: "horizontal_flip", ty: "bool", default: "true", help: "add the left-right mirror (view 1)" },
        OptionDoc {
            name: "vertical_flip",
            ty: "bool",
            default: "false",
            help: "add upside down (view 2), and both flips (view 3) with horizontal_flip",
        },
    ];
    const PARALLEL: bool = true;
    const AFFECTS_PIXELS: bool = true;
    // A cached original cannot stand in for its mirror image: this stage needs pixels.
    const PASSES_PRECOMPUTED: bool = false;

    fn facts(&self, input: &Facts, _env: bool) -> Result<Facts, Vec<FieldError>> {
        Ok(Facts { views: self.views().len() as u8, ..input.clone() })
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(Views { config: self.clone() })))
    }
}

struct Views {
    config: ViewsConfig,
}

impl ViewsConfig {
    /// The views emitted, in order; 0 (the image as it is) always first.
    pub fn views(&self) -> Vec<u8> {
        let (h, v) = (self.horizontal_flip, self.vertical_flip);
        [(0, true), (1, h), (2, v), (3, h && v)].into_iter().filter_map(|(view, on)| on.then_some(view)).collect()
    }
}

/// The pixels of `view` of `img` (RGB or gray).
pub fn view_of<P: Pixel + 'static>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    view: u8,
) -> ImageBuffer<P, Vec<P::Subpixel>> {
    match view {
        1 => flip_horizontal(img),
        2 => flip_vertical(img),
        3 => flip_vertical(&flip_horizontal(img)),
        _ => img.clone(),
    }
}

impl Stage for Views {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        if item.meta.view != 0 {
            return Err(StageError::fatal(format!(
                "{}: already view {} of its image (two views stages in a row?)",
                item.meta.path.display(),
                item.meta.view
            )));
        }
        let view_of_item: Box<dyn Fn(u8) -> Payload + '_> = match &item.payload {
            Payload::Gray(img) => Box::new(|view| Payload::Gray(view_of(img, view))),
            Payload::Image(img) => Box::new(|view| Payload::Image(view_of(img, view))),
            _ => return Err(StageError::fatal(format!("expected an image, got {}", item.kind().name()))),
        };
        let mirrors: Vec<Item> = (self.config.views().into_iter().skip(1))
            .map(|view| Item { meta: crate::item::Meta { view, ..item.meta.clone() }, payload: view_of_item(view) })
            .collect();
        drop(view_of_item);
        out.emit(item)?;
        for mirror in mirrors {
            out.emit(mirror)?;
        }
        Ok(())
    }

    fn images_per_input(&self) -> u64 {
        self.config.views().len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

    #[test]
    fn views_follow_the_options_and_mirror_the_pixels() {
        let cfg = |h, v| ViewsConfig { horizontal_flip: h, vertical_flip: v };
        assert_eq!(cfg(true, false).views(), vec![0, 1]);
        assert_eq!(cfg(false, true).views(), vec![0, 2]);
        assert_eq!(cfg(true, true).views(), vec![0, 1, 2, 3]);
        assert_eq!(cfg(false, false).views(), vec![0]);
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(view_of(&img, 1).get_pixel(0, 1).0, [2, 1, 7], "left-right");
        assert_eq!(view_of(&img, 2).get_pixel(0, 1).0, [0, 0, 7], "upside down");
        assert_eq!(view_of(&img, 3).get_pixel(0, 1).0, [2, 0, 7], "both");
        assert_eq!(view_of(&img, 0), img);
    }
}
