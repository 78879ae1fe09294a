//! Whether an encoded file holds the whole image. Some decoders fill in what
//! a file cut short is missing (the JPEG decoders pad the missing rows; PIL
//! refuses such a file, "image file is truncated", unless told
//! `LOAD_TRUNCATED_IMAGES`), so completeness is checked on the bytes, the
//! same way on every decode path.

/// `Err(reason)` when the file ends before its format says it does.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return jpeg(bytes);
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return png(bytes);
    }
    if bytes.starts_with(b"RIFF") {
        return webp(bytes);
    }
    // GIF: the gif decoder refuses a first frame cut short; as in PIL, the
    // first frame is the image, so frames after it and the trailer are not
    // needed. BMP and TIFF: their decoders refuse missing pixel data.
    Ok(())
}

/// A RIFF container says its length: a WebP shorter than that is cut short.
fn webp(b: &[u8]) -> Result<(), String> {
    const TRUNCATED: &str = "truncated: the WebP data ends before the length its RIFF header gives";
    if b.len() < 12 {
        return if b"WEBP".starts_with(&b[8.min(b.len())..]) { Err(TRUNCATED.into()) } else { Ok(()) };
    }
    if &b[8..12] != b"WEBP" {
        return Ok(());
    }
    let size = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
    if b.len() < size.saturating_add(8) { Err(TRUNCATED.into()) } else { Ok(()) }
}

const TRUNCATED_JPEG: &str =
    "truncated: the JPEG data ends before its end-of-image marker (PIL: image file is truncated)";

/// Walks the marker segments by their lengths and the entropy-coded data
/// after each start-of-scan to the end-of-image marker, which is what
/// proves the scan data complete. Bytes after it (some cameras append
/// data) are allowed.
fn jpeg(b: &[u8]) -> Result<(), String> {
    let mut i = 2;
    loop {
        // Fill bytes (0xFF) may precede a marker.
        while i < b.len() && b[i] == 0xFF && b.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        if i + 1 >= b.len() {
            return Err(TRUNCATED_JPEG.into());
        }
        if b[i] != 0xFF {
            return Err(format!("corrupt JPEG: expected a marker at byte {i}"));
        }
        let marker = b[i + 1];
        i += 2;
        match marker {
            0xD9 => return Ok(()),
            // Markers without a length: TEM, restart markers.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        if i + 2 > b.len() {
            return Err(TRUNCATED_JPEG.into());
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        if len < 2 {
            return Err(format!("corrupt JPEG: segment length {len} at byte {i}"));
        }
        i += len;
        if i > b.len() {
            return Err(TRUNCATED_JPEG.into());
        }
        if marker == 0xDA {
            // Entropy-coded data: 0xFF is stuffed as FF 00, restarts are FF D0-D7;
            // any other FF xx is the next marker.
            loop {
                match b[i..].iter().position(|&x| x == 0xFF) {
                    None => return Err(TRUNCATED_JPEG.into()),
                    Some(p) => i += p,
                }
                match b.get(i + 1) {
                    None => return Err(TRUNCATED_JPEG.into()),
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

const TRUNCATED_PNG: &str = "truncated: the PNG data ends before its IEND chunk";

/// Walks the chunks by their lengths to IEND, checking each CRC, as
/// libpng and PIL do (PIL: "broken PNG file" / "image file is truncated").
fn png(b: &[u8]) -> Result<(), String> {
    let mut i = 8;
    loop {
        if i + 8 > b.len() {
            return Err(TRUNCATED_PNG.into());
        }
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let kind = &b[i + 4..i + 8];
        let end = i.checked_add(12).and_then(|e| e.checked_add(len)).ok_or("corrupt PNG: chunk length")?;
        if end > b.len() {
            return Err(TRUNCATED_PNG.into());
        }
        let crc = u32::from_be_bytes([b[end - 4], b[end - 3], b[end - 2], b[end - 1]]);
        if crc32(&b[i + 4..end - 4]) != crc {
            return Err(format!(
                "corrupt PNG: CRC mismatch in the {} chunk at byte {i}",
                String::from_utf8_lossy(kind)
            ));
        }
        if kind == b"IEND" {
            return Ok(());
        }
        i = end;
    }
}

/// CRC-32 (ISO 3309, PNG's), bytewise with a table built at compile time.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut n = 0;
        while n < 256 {
            let mut c = n as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[n] = c;
            n += 1;
        }
        t
    };
    let mut c = 0xFFFF_FFFFu32;
    for &x in data {
        c = TABLE[((c ^ x as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_pngs() {
        // The IEND chunk's CRC, in every PNG.
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }
}
