//! Arbitrary bytes -> `decode_image` with a small `max_pixels`: an error
//! string or an RGB image of at most that many pixels, never a panic, a hang
//! or an allocation beyond the limit's worth.

#![no_main]

use libfuzzer_sys::fuzz_target;

const MAX_PIXELS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = convflow::imaging::decode::decode_image(data, MAX_PIXELS) {
        let (w, h) = img.dimensions();
        assert!(u64::from(w) * u64::from(h) <= MAX_PIXELS, "{w}x{h} decoded past max_pixels");
        assert_eq!(img.as_raw().len() as u64, 3 * u64::from(w) * u64::from(h));
    }
});
