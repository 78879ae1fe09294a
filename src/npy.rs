//! Streaming `.npy` writer: rows are appended as they arrive and the header,
//! which holds the row count, is rewritten when the file is finished. The
//! file is written under a `.partial` name and renamed only when complete,
//! so a reader never sees a half-written array.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Room reserved for the header; the dict for any realistic shape fits.
const HEADER_LEN: usize = 128;

pub struct NpyWriter {
    file: BufWriter<File>,
    partial: PathBuf,
    path: PathBuf,
    row_shape: Vec<usize>,
    rows: usize,
}

fn header(rows: usize, row_shape: &[usize]) -> std::io::Result<Vec<u8>> {
    let dims: Vec<String> = std::iter::once(rows).chain(row_shape.iter().copied()).map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let prefix = 10; // magic (6) + version (2) + header length (2)
    if prefix + dict.len() + 1 > HEADER_LEN {
        return Err(std::io::Error::other(format!("npy shape {shape} too long for the header")));
    }
    while prefix + dict.len() + 1 < HEADER_LEN {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&((HEADER_LEN - prefix) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    Ok(out)
}

impl NpyWriter {
    /// A float32 array whose rows have `row_shape` (empty for a 1-D array).
    pub fn create(path: &Path, row_shape: &[usize]) -> std::io::Result<NpyWriter> {
        let partial = path.with_extension("npy.partial");
        let mut file = BufWriter::new(File::create(&partial)?);
        file.write_all(&header(0, row_shape)?)?;
        Ok(NpyWriter { file, partial, path: path.to_path_buf(), row_shape: row_shape.to_vec(), rows: 0 })
    }

    pub fn row_shape(&self) -> &[usize] {
        &self.row_shape
    }

    pub fn push(&mut self, row: &[f32]) -> std::io::Result<()> {
        let expected: usize = self.row_shape.iter().product();
        if row.len() != expected {
            return Err(std::io::Error::other(format!("row of {} values, expected {:?}", row.len(), self.row_shape)));
        }
        let mut bytes = Vec::with_capacity(row.len() * 4);
        for x in row {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        self.file.write_all(&bytes)?;
        self.rows += 1;
        Ok(())
    }

    /// Appends whole rows already in `<f4` little-endian bytes (another
    /// array's data section), as `push` would have written them.
    pub fn push_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let row_bytes = 4 * self.row_shape.iter().product::<usize>();
        if row_bytes == 0 || !bytes.len().is_multiple_of(row_bytes) {
            return Err(std::io::Error::other(format!(
                "{} bytes are not whole rows of {:?}",
                bytes.len(),
                self.row_shape
            )));
        }
        self.file.write_all(bytes)?;
        self.rows += bytes.len() / row_bytes;
        Ok(())
    }

    /// Writes the final header, syncs and renames into place.
    pub fn finish(mut self) -> std::io::Result<usize> {
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&header(self.rows, &self.row_shape)?)?;
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&self.partial, &self.path)?;
        Ok(self.rows)
    }

    /// Removes the partial file (interrupted or failed run).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// The shape and data offset of a C-order float32 `.npy` file, from its
/// header alone (the merge streams the data after it).
pub fn read_header(path: &Path) -> std::io::Result<(Vec<usize>, u64)> {
    use std::io::Read;
    let bad = |m: &str| std::io::Error::other(format!("{}: {m}", path.display()));
    let mut f = File::open(path)?;
    let mut prefix = [0u8; 10];
    f.read_exact(&mut prefix).map_err(|_| bad("not an npy file"))?;
    if &prefix[..6] != b"\x93NUMPY" {
        return Err(bad("not an npy file"));
    }
    let hlen = u16::from_le_bytes([prefix[8], prefix[9]]) as usize;
    let mut dict = vec![0u8; hlen];
    f.read_exact(&mut dict).map_err(|_| bad("truncated header"))?;
    let dict = std::str::from_utf8(&dict).map_err(|_| bad("bad header"))?;
    if !dict.contains("'<f4'") || dict.contains("'fortran_order': True") {
        return Err(bad("expected a C-order float32 array"));
    }
    let shape_text =
        dict.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape"))?;
    let shape = shape_text
        .split(',')
        .filter(|d| !d.trim().is_empty())
        .map(|d| d.trim().parse().map_err(|_| bad("bad shape")))
        .collect::<Result<Vec<usize>, _>>()?;
    let len = f.metadata()?.len();
    let offset = 10 + hlen as u64;
    if len - offset.min(len) != 4 * shape.iter().product::<usize>() as u64 {
        return Err(bad("data length does not match the shape"));
    }
    Ok((shape, offset))
}

/// Reads a float32 `.npy` written by [`NpyWriter`] (or numpy): shape and data.
pub fn read_f32(path: &Path) -> std::io::Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path)?;
    let bad = |m: &str| std::io::Error::other(format!("{}: {m}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not an npy file"));
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let dict = std::str::from_utf8(&bytes[10..10 + hlen]).map_err(|_| bad("bad header"))?;
    if !dict.contains("'<f4'") || dict.contains("'fortran_order': True") {
        return Err(bad("expected a C-order float32 array"));
    }
    let shape_text =
        dict.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_text.split(',').filter_map(|d| d.trim().parse().ok()).collect();
    let data =
        bytes[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
    if data.len() != shape.iter().product::<usize>() {
        return Err(bad("data length does not match the shape"));
    }
    Ok((shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let mut w = NpyWriter::create(&p, &[2, 3]).unwrap();
        w.push(&[1., 2., 3., 4., 5., 6.]).unwrap();
        w.push(&[0.; 6]).unwrap();
        assert!(w.push(&[1.0]).is_err());
        assert!(!p.exists(), "only the partial file exists before finish");
        assert_eq!(w.finish().unwrap(), 2);
        let (shape, data) = read_f32(&p).unwrap();
        assert_eq!(shape, vec![2, 2, 3]);
        assert_eq!(data[5], 6.0);
        let mut w = NpyWriter::create(&dir.path().join("l.npy"), &[]).unwrap();
        w.push(&[1.0]).unwrap();
        w.finish().unwrap();
        assert_eq!(read_f32(&dir.path().join("l.npy")).unwrap().0, vec![1]);
    }
}
