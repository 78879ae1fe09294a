//! JPEG decoding at a reduced DCT scale through libjpeg-turbo (the C shim
//! `libjpeg_shim.c` beside this file): the decoder computes a 1/2, 1/4 or 1/8
//! size image straight from the DCT coefficients, skipping most of the
//! inverse DCT, upsampling and colour conversion of a full decode. This is
//! what PIL's `Image.draft` does.

use std::ffi::{CStr, c_char, c_int, c_uchar, c_uint, c_ulong};
use std::ptr::NonNull;

use image::RgbImage;
use image::metadata::Orientation;

#[repr(C)]
struct CfJpeg {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn cf_jpeg_new() -> *mut CfJpeg;
    fn cf_jpeg_free(h: *mut CfJpeg);
    fn cf_jpeg_message(h: *const CfJpeg) -> *const c_char;
    fn cf_jpeg_header(
        h: *mut CfJpeg,
        data: *const c_uchar,
        len: c_ulong,
        width: *mut c_uint,
        height: *mut c_uint,
        components: *mut c_int,
        exif: *mut *const c_uchar,
        exif_len: *mut c_uint,
    ) -> c_int;
    fn cf_jpeg_decode(
        h: *mut CfJpeg,
        scale_num: c_int,
        out: *mut c_uchar,
        cap: c_ulong,
        out_w: *mut c_uint,
        out_h: *mut c_uint,
    ) -> c_int;
}

/// What the header says.
pub struct Header {
    pub width: u32,
    pub height: u32,
    pub components: i32,
    pub orientation: Orientation,
}

/// One libjpeg decompressor, reused image after image by one worker.
pub struct ScaledJpeg(NonNull<CfJpeg>);

// SAFETY: the handle is owned by one `ScaledJpeg` and only used through
// `&mut self`; libjpeg keeps no thread-local state.
unsafe impl Send for ScaledJpeg {}

impl Drop for ScaledJpeg {
    fn drop(&mut self) {
        // SAFETY: the pointer came from cf_jpeg_new and is freed once.
        unsafe { cf_jpeg_free(self.0.as_ptr()) }
    }
}

/// Smallest `m` of m/8 in {1, 2, 4, 8} whose output, `ceil(side * m / 8)`
/// as libjpeg computes it, is still at least `min` on both sides.
pub fn scale_eighths(width: u32, height: u32, min_width: u32, min_height: u32) -> u32 {
    let fits = |m: u32| {
        (width as u64 * m as u64).div_ceil(8) >= min_width as u64
            && (height as u64 * m as u64).div_ceil(8) >= min_height as u64
    };
    [1, 2, 4].into_iter().find(|&m| fits(m)).unwrap_or(8)
}

/// Output size of libjpeg at `m`/8.
pub fn scaled_size(width: u32, height: u32, m: u32) -> (u32, u32) {
    ((width as u64 * m as u64).div_ceil(8) as u32, (height as u64 * m as u64).div_ceil(8) as u32)
}

impl ScaledJpeg {
    pub fn new() -> Result<Self, String> {
        // SAFETY: plain constructor; NULL means out of memory.
        NonNull::new(unsafe { cf_jpeg_new() }).map(ScaledJpeg).ok_or_else(|| "cannot create a libjpeg decoder".into())
    }

    fn message(&self) -> String {
        // SAFETY: the shim keeps a NUL-terminated buffer inside the handle.
        unsafe { CStr::from_ptr(cf_jpeg_message(self.0.as_ptr())) }.to_string_lossy().into_owned()
    }

    /// Reads the header of `data`, asks `choose` for the scale (`m` of m/8,
    /// or `None` to stop there) and decodes at that scale. One call holds
    /// `data` for both steps, as libjpeg reads it in both. The image is as
    /// stored: the caller applies `Header::orientation`.
    pub fn decode(
        &mut self,
        data: &[u8],
        choose: impl FnOnce(&Header) -> Option<u32>,
    ) -> Result<(Header, Option<RgbImage>), String> {
        let (mut width, mut height, mut components) = (0, 0, 0);
        let (mut exif, mut exif_len): (*const c_uchar, c_uint) = (std::ptr::null(), 0);
        // SAFETY: data outlives the call; the out-pointers are to locals.
        let rc = unsafe {
            cf_jpeg_header(
                self.0.as_ptr(),
                data.as_ptr(),
                data.len() as c_ulong,
                &mut width,
                &mut height,
                &mut components,
                &mut exif,
                &mut exif_len,
            )
        };
        if rc != 0 {
            return Err(self.message());
        }
        let orientation = if exif.is_null() {
            None
        } else {
            // SAFETY: the shim points into libjpeg's saved marker, alive until the next call on this handle.
            Orientation::from_exif_chunk(unsafe { std::slice::from_raw_parts(exif, exif_len as usize) })
        };
        let header =
            Header { width, height, components, orientation: orientation.unwrap_or(Orientation::NoTransforms) };
        let Some(m) = choose(&header) else { return Ok((header, None)) };
        let (w, h) = scaled_size(width, height, m);
        let len = w as usize * h as usize * 3;
        // Not zeroed: libjpeg writes every row, and on failure nothing is read.
        let mut pixels: Vec<u8> = Vec::with_capacity(len);
        let (mut out_w, mut out_h) = (0, 0);
        // SAFETY: `data`, still borrowed, is the buffer libjpeg's source
        // points at; `pixels` has room for `len` bytes and the shim checks
        // that the output fits before writing.
        let rc = unsafe {
            cf_jpeg_decode(self.0.as_ptr(), m as c_int, pixels.as_mut_ptr(), len as c_ulong, &mut out_w, &mut out_h)
        };
        if rc != 0 {
            return Err(self.message());
        }
        if (out_w, out_h) != (w, h) {
            return Err(format!("libjpeg made {out_w}x{out_h}, expected {w}x{h}"));
        }
        // SAFETY: success means all `out_h` rows of `out_w * 3` bytes, `len` in all, were written.
        unsafe { pixels.set_len(len) };
        let img = RgbImage::from_raw(w, h, pixels).ok_or("wrong buffer size")?;
        Ok((header, Some(img)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_the_smallest_power_of_two_that_still_covers_the_target() {
        assert_eq!(scale_eighths(500, 375, 150, 150), 4); // 250x188; 1/4 would be 125x94
        assert_eq!(scale_eighths(1280, 1200, 150, 150), 1); // 160x150
        assert_eq!(scale_eighths(1193, 1193, 150, 150), 1); // libjpeg rounds 149.1 up to 150
        assert_eq!(scale_eighths(1192, 1192, 150, 150), 2); // 1/8 would be 149
        assert_eq!(scale_eighths(299, 400, 150, 150), 4); // 150x200
        assert_eq!(scale_eighths(298, 400, 150, 150), 8); // 1/2 would be 149 wide
        assert_eq!(scale_eighths(100, 100, 150, 150), 8);
        assert_eq!(scaled_size(500, 375, 4), (250, 188));
        assert_eq!(scaled_size(500, 375, 8), (500, 375));
    }
}
