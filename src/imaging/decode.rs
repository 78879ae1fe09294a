//! Decoding image files to 8-bit RGB as PIL does (so as Keras's `load_img`):
//! JPEGs through libjpeg-turbo with PIL's settings, the other formats
//! through the `image` crate (docs/keras-pixels.md). The `decode` stage,
//! the CLI, `visualize` and the benches share it.

mod complete;
mod jpeg;

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};

/// PIL's `convert('L')` of an RGB image: `L = R*299/1000 + G*587/1000 +
/// B*114/1000` in its 16-bit fixed point, rounded. A gray pixel (v, v, v)
/// stays v, so gray files keep their values.
pub fn to_gray(img: &RgbImage) -> GrayImage {
    let luma = img
        .as_raw()
        .chunks_exact(3)
        .map(|p| ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8);
    GrayImage::from_raw(img.width(), img.height(), luma.collect()).expect("one byte per pixel")
}

/// PIL's `MAX_IMAGE_PIXELS` * 2, where PIL turns its warning into an error.
pub fn default_max_pixels() -> u64 {
    // PIL's MAX_IMAGE_PIXELS * 2, where PIL turns its warning into an error.
    178_956_970
}

/// The decode stage's work on one worker, also usable on its own (benches).
pub struct Decoder {
    max_pixels: u64,
    load_truncated: bool,
    /// (height, width) a JPEG decoded at a reduced DCT scale must still cover.
    min_size: Option<(u32, u32)>,
    /// The libjpeg-turbo decompressor every JPEG goes through first.
    jpeg: jpeg::ScaledJpeg,
}

impl Decoder {
    /// `min_size`: (height, width) that a JPEG decoded at a reduced scale must still cover.
    pub fn new(max_pixels: u64, min_size: Option<(u32, u32)>) -> Result<Self, String> {
        Ok(Decoder { max_pixels, load_truncated: false, min_size, jpeg: jpeg::ScaledJpeg::new()? })
    }

    /// PIL's `LOAD_TRUNCATED_IMAGES` (see [`DecodeConfig`]).
    pub fn load_truncated_images(mut self, on: bool) -> Self {
        self.load_truncated = on;
        self
    }

    /// Like [`decode_image`], with the DCT-domain scaling when `min_size` is set.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<RgbImage, String> {
        if !self.load_truncated {
            complete::check(bytes)?;
        }
        if let Some(img) = decode_jpeg(&mut self.jpeg, bytes, self.min_size, self.max_pixels) {
            return Ok(img);
        }
        decode_any(bytes, self.max_pixels)
    }
}

/// A JPEG through libjpeg-turbo with PIL's settings (its default integer
/// IDCT, fancy upsampling, RGB out), so the pixels are the ones PIL, and so
/// Keras's `load_img`, sees; at a reduced DCT scale when `min_size` allows.
/// `None` hands the file to the `image` crate's decoders: not a JPEG, an
/// unusual colour space (CMYK, which PIL converts its own way), a file over
/// `max_pixels`, or anything libjpeg finds wrong, even a mere warning, so
/// bad files get one treatment and one set of messages on every path.
fn decode_jpeg(
    jpeg: &mut jpeg::ScaledJpeg,
    bytes: &[u8],
    min_size: Option<(u32, u32)>,
    max_pixels: u64,
) -> Option<RgbImage> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return None;
    }
    let (header, img) = jpeg
        .decode(bytes, |h| {
            if !matches!(h.components, 1 | 3) || (h.width as u64) * (h.height as u64) > max_pixels {
                return None;
            }
            let Some((min_h, min_w)) = min_size else { return Some(8) };
            // The target is in display orientation; a quarter turn swaps the stored sides.
            let swapped = matches!(
                h.orientation,
                Orientation::Rotate90
                    | Orientation::Rotate270
                    | Orientation::Rotate90FlipH
                    | Orientation::Rotate270FlipH
            );
            let (need_w, need_h) = if swapped { (min_h, min_w) } else { (min_w, min_h) };
            Some(jpeg::scale_eighths(h.width, h.height, need_w, need_h))
        })
        .ok()?;
    let img = img?;
    if header.orientation == Orientation::NoTransforms {
        return Some(img);
    }
    let mut dynamic = DynamicImage::ImageRgb8(img);
    dynamic.apply_orientation(header.orientation);
    Some(dynamic.into_rgb8())
}

thread_local! {
    /// One libjpeg decompressor per thread for [`decode_image`], made on first use.
    static JPEG: std::cell::RefCell<Option<jpeg::ScaledJpeg>> = const { std::cell::RefCell::new(None) };
}

/// Decodes one file's bytes; the error says why, for the skipped list. A
/// file cut short is an error ("truncated: ..."). JPEGs give PIL's pixels.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    complete::check(bytes)?;
    let jpeg = JPEG.with_borrow_mut(|slot| {
        if slot.is_none() {
            *slot = jpeg::ScaledJpeg::new().ok();
        }
        slot.as_mut().and_then(|jpeg| decode_jpeg(jpeg, bytes, None, max_pixels))
    });
    match jpeg {
        Some(img) => Ok(img),
        None => decode_any(bytes, max_pixels),
    }
}

/// The `image` crate's decoders alone (zune-jpeg for JPEG), the default
/// before JPEGs went through libjpeg-turbo: for the decode benchmark's
/// side-by-side row. Its JPEG pixels differ from PIL's by up to a few levels.
pub fn decode_image_rs(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    complete::check(bytes)?;
    decode_any(bytes, max_pixels)
}

/// [`decode_image`] without the completeness check: what a decoder makes of
/// the bytes, a JPEG cut short included.
fn decode_any(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    if bytes.starts_with(&[0x00, 0x05, 0x16, 0x07]) {
        return Err("an AppleDouble file (macOS metadata, `._` name), not an image".into());
    }
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not a recognised image format".into());
    }
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (w, h) = decoder.dimensions();
    if (w as u64) * (h as u64) > max_pixels {
        return Err(format!("{w}x{h} is over max_pixels ({max_pixels})"));
    }
    if w == 0 || h == 0 {
        return Err("image has no pixels".into());
    }
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// The decoder's error as a reason; a file that ends early says "truncated".
fn decode_error(e: image::ImageError) -> String {
    let eof = match &e {
        image::ImageError::IoError(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        other => {
            let m = other.to_string().to_ascii_lowercase();
            m.contains("eof") || m.contains("end of file") || m.contains("unexpected end") || m.contains("truncat")
        }
    };
    if eof { format!("truncated: the file ends early ({e})") } else { format!("cannot decode: {e}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::resize::{Filter, Resize};
    use crate::stages::decode::DecodeConfig;
    use image::codecs::jpeg::JpegEncoder;

    /// A smooth synthetic photo as JPEG bytes.
    fn photo(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]));
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
        out
    }

    /// `jpeg` with an Exif APP1 segment (big-endian TIFF, one tag: orientation) right after SOI.
    fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut app1 = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        app1.extend(orientation.to_be_bytes());
        app1.extend([0, 0, 0, 0, 0, 0]);
        let mut out = jpeg[..2].to_vec();
        out.extend([0xFF, 0xE1]);
        out.extend(((app1.len() + 2) as u16).to_be_bytes());
        out.extend(app1);
        out.extend(&jpeg[2..]);
        out
    }

    fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
        assert_eq!(a.dimensions(), b.dimensions());
        let sum: u64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y) as u64).sum();
        sum as f64 / a.as_raw().len() as f64
    }

    fn scaled(min_h: u32, min_w: u32) -> Decoder {
        Decoder::new(u64::MAX, Some((min_h, min_w))).unwrap()
    }

    #[test]
    fn min_size_takes_a_pair_one_number_or_null_and_is_absent_from_the_key_when_unset() {
        let parse = |v: serde_json::Value| {
            serde_json::from_value::<DecodeConfig>(v).map(|c| c.min_size).map_err(|e| e.to_string())
        };
        assert_eq!(parse(serde_json::json!({})), Ok(None));
        assert_eq!(parse(serde_json::json!({"min_size": null})), Ok(None));
        assert_eq!(parse(serde_json::json!({"min_size": 150})), Ok(Some([150, 150])));
        assert_eq!(parse(serde_json::json!({"min_size": [150, 120]})), Ok(Some([150, 120])));
        let err = parse(serde_json::json!({"min_size": "big"})).unwrap_err();
        assert!(err.contains("a size [height, width], or one number for both"), "{err}");
        let unset: DecodeConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(serde_json::to_string(&unset).unwrap(), r#"{"max_pixels":178956970,"pixel_rules":"pil-13"}"#);
        let err = serde_json::from_value::<DecodeConfig>(serde_json::json!({"pixel_rules": "x"})).unwrap_err();
        assert!(err.to_string().contains("unknown field `pixel_rules`"), "not an option: {err}");
    }

    #[test]
    fn min_size_decodes_at_the_smallest_scale_that_covers_it() {
        let bytes = photo(400, 300);
        let full = decode_image(&bytes, u64::MAX).unwrap();
        let half = scaled(150, 150).decode(&bytes).unwrap();
        assert_eq!(half.dimensions(), (200, 150), "1/2; 1/4 would be 100x75");
        assert_eq!(scaled(70, 90).decode(&bytes).unwrap().dimensions(), (100, 75), "1/4");
        assert_eq!(scaled(1, 1).decode(&bytes).unwrap().dimensions(), (50, 38), "1/8, rounded up as libjpeg does");
        let boxed = Resize::new(150, 200, Filter::Box).apply(full).unwrap();
        let d = mean_abs_diff(&half, &boxed);
        assert!(d < 2.0, "a scaled decode is close to a box-filtered full decode: {d}");
    }

    #[test]
    fn images_too_small_to_scale_decode_exactly_as_without_min_size() {
        let bytes = photo(200, 200);
        assert_eq!(scaled(150, 150).decode(&bytes).unwrap(), decode_image(&bytes, u64::MAX).unwrap());
        let cmyk = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/dogs/cmyk.jpg")).unwrap();
        assert_eq!(scaled(1, 1).decode(&cmyk).unwrap(), decode_image(&cmyk, u64::MAX).unwrap(), "CMYK: full path");
        let png = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/cats/alpha.png")).unwrap();
        assert_eq!(scaled(1, 1).decode(&png).unwrap(), decode_image(&png, u64::MAX).unwrap());
    }

    #[test]
    fn exif_orientation_is_applied_and_chooses_the_scale_in_display_orientation() {
        let bytes = with_orientation(&photo(400, 300), 6);
        let full = decode_image(&bytes, u64::MAX).unwrap();
        assert_eq!(full.dimensions(), (300, 400), "the Exif segment is read by the default path too");
        let half = scaled(150, 150).decode(&bytes).unwrap();
        assert_eq!(half.dimensions(), (150, 200));
        // 180 high x 120 wide on display needs 180 of the stored width: 1/2, not 1/4 (100 wide stored).
        assert_eq!(scaled(180, 70).decode(&bytes).unwrap().dimensions(), (150, 200));
        let boxed = Resize::new(200, 150, Filter::Box).apply(full).unwrap();
        let d = mean_abs_diff(&half, &boxed);
        assert!(d < 2.0, "rotated the same way as the full decode: {d}");
    }

    #[test]
    fn grayscale_jpegs_scale_to_rgb() {
        let img = image::GrayImage::from_fn(320, 320, |x, _| image::Luma([(x * 255 / 320) as u8]));
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&img).unwrap();
        let out = scaled(100, 100).decode(&bytes).unwrap();
        assert_eq!(out.dimensions(), (160, 160));
        assert!(out.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    }

    #[test]
    fn bad_files_get_the_outcome_and_messages_of_the_full_path() {
        let good = photo(400, 300);
        let bad_fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bad");
        // Every one is refused the same way on both paths; a photo cut short as truncated.
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"not an image".to_vec(),
            b"\xFF\xD8\xFF\xE0 not a JPEG after all".to_vec(),
            good[..good.len() / 3].to_vec(),
        ];
        for f in ["cats/empty.jpg", "cats/truncated.jpg", "dogs/text.jpg", "dogs/bomb.png"] {
            cases.push(std::fs::read(format!("{bad_fixtures}/{f}")).unwrap());
        }
        let mut decoder = Decoder::new(178_956_970, Some((150, 150))).unwrap();
        for (i, bytes) in cases.iter().enumerate() {
            let (got, expected) = (decoder.decode(bytes), decode_image(bytes, 178_956_970));
            assert!(got == expected, "case {i}: {:?} vs {:?}", got.err(), expected.err());
            // The same decompressor is still good after whatever this file did to it.
            assert_eq!(decoder.decode(&good).unwrap().dimensions(), (200, 150));
        }
        let err = Decoder::new(1000, Some((10, 10))).unwrap().decode(&good).unwrap_err();
        assert!(err.contains("400x300 is over max_pixels (1000)"), "{err}");
    }

    fn fixture(rel: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    /// Every format convflow reads, cut at several points from just after
    /// the header to one byte short, is refused as truncated on the default
    /// path and the `min_size` path alike.
    #[test]
    fn files_cut_short_are_truncated_on_every_path_and_format() {
        let mut files: Vec<(String, Vec<u8>)> = vec![("photo.jpg".into(), photo(400, 300))];
        for f in [
            "images/cats/cat.1.jpg",
            "images/cats/progressive.jpg",
            "images/dogs/cmyk.jpg",
            "images/dogs/rotated.jpg",
            "images/cats/cat.2.png",
            "images/cats/alpha.png",
            "images/dogs/deep.png",
            "formats/cats/palette.gif",
            "formats/cats/anim.gif",
            "formats/cats/plain.bmp",
            "formats/cats/lzw.tif",
            "formats/dogs/plain.tif",
            "formats/dogs/lossy.webp",
            "formats/dogs/lossless.webp",
        ] {
            files.push((f.into(), fixture(f)));
        }
        let mut scaled = Decoder::new(178_956_970, Some((16, 16))).unwrap();
        let mut failures = Vec::new();
        for (name, bytes) in &files {
            decode_image(bytes, u64::MAX).unwrap_or_else(|e| panic!("{name} whole: {e}"));
            // A GIF's first frame is the image (as in PIL): cut after it, it
            // is whole. Its last bytes can be the LZW end code and padding,
            // which no decoder needs for the pixels, so it is not cut one short.
            let gif = name.ends_with(".gif");
            let n = if gif { first_gif_frame_end(bytes) } else { bytes.len() };
            let cuts = [n / 4, n / 2, 3 * n / 4, 9 * n / 10, n - 1];
            for &cut in &cuts[..if gif { 4 } else { 5 }] {
                for (path, got) in
                    [("default", decode_image(&bytes[..cut], u64::MAX)), ("min_size", scaled.decode(&bytes[..cut]))]
                {
                    match got {
                        Err(e) if e.starts_with("truncated") => {}
                        other => failures
                            .push(format!("{name} cut at {cut}/{n}, {path}: {:?}", other.map(|i| i.dimensions()))),
                    }
                }
            }
        }
        assert!(failures.is_empty(), "not refused as truncated:\n{}", failures.join("\n"));
    }

    /// Where a GIF's first image ends: after its image descriptor, local
    /// colour table and LZW data sub-blocks.
    fn first_gif_frame_end(b: &[u8]) -> usize {
        let mut i = 13 + if b[10] & 0x80 != 0 { 3 << ((b[10] & 7) + 1) } else { 0 };
        let sub_blocks = |mut i: usize| {
            while b[i] != 0 {
                i += b[i] as usize + 1;
            }
            i + 1
        };
        loop {
            match b[i] {
                0x21 => i = sub_blocks(i + 2),
                0x2C => {
                    let local = if b[i + 9] & 0x80 != 0 { 3 << ((b[i + 9] & 7) + 1) } else { 0 };
                    return sub_blocks(i + 10 + local + 1);
                }
                other => panic!("unexpected GIF block {other:#x} at {i}"),
            }
        }
    }

    #[test]
    fn gif_frames_after_the_first_are_not_needed_as_in_pil() {
        let anim = fixture("formats/cats/anim.gif");
        let end = first_gif_frame_end(&anim);
        assert!(end < anim.len() - 10, "the fixture has a second frame");
        assert_eq!(decode_image(&anim[..end], u64::MAX).unwrap(), decode_image(&anim, u64::MAX).unwrap());
        assert!(decode_image(&anim[..end * 9 / 10], u64::MAX).unwrap_err().starts_with("truncated"));
    }

    #[test]
    fn load_truncated_images_decodes_a_jpeg_cut_short_as_pil_does() {
        let bytes = photo(400, 300);
        let cut = &bytes[..bytes.len() / 2];
        for min_size in [None, Some((150, 150))] {
            let mut d = Decoder::new(178_956_970, min_size).unwrap().load_truncated_images(true);
            let img = d.decode(cut).unwrap();
            assert_eq!(img.dimensions(), (400, 300), "the full size, the missing rows filled in");
            let mut strict = Decoder::new(178_956_970, min_size).unwrap();
            assert!(strict.decode(cut).unwrap_err().starts_with("truncated"));
        }
        let on: DecodeConfig = serde_json::from_value(serde_json::json!({"load_truncated_images": true})).unwrap();
        assert!(serde_json::to_string(&on).unwrap().contains("load_truncated_images"), "a different cache key");
    }

    #[test]
    fn a_corrupt_png_checksum_an_appledouble_file_and_a_one_pixel_image() {
        let mut png = fixture("images/cats/cat.2.png");
        let last_idat_byte = png.len() - 12 - 5;
        png[last_idat_byte] ^= 0x55;
        let err = decode_image(&png, u64::MAX).unwrap_err();
        assert!(err.contains("CRC mismatch in the IDAT chunk"), "{err}");
        let mut apple = vec![0x00, 0x05, 0x16, 0x07, 0, 2, 0, 0];
        apple.extend([0u8; 80]);
        assert!(decode_image(&apple, u64::MAX).unwrap_err().contains("AppleDouble"));
        let one = RgbImage::from_pixel(1, 1, image::Rgb([10, 20, 30]));
        let mut jpg = Vec::new();
        JpegEncoder::new_with_quality(&mut jpg, 95).encode_image(&one).unwrap();
        assert_eq!(decode_image(&jpg, u64::MAX).unwrap().dimensions(), (1, 1));
        assert_eq!(scaled(150, 150).decode(&jpg).unwrap().dimensions(), (1, 1));
    }
}
