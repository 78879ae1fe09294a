//! The manifest: the source's listing written once by `convflow plan`, one
//! line per item, plus a sparse index so a shard seeks straight to its range
//! instead of reading (or listing) everything before it.
//!
//! `manifest.tsv`: `SPLIT<TAB>LABEL<TAB>PATH\n`, SPLIT and LABEL indices
//! into the plan's `splits` and `classes` (`-` for none), PATH the file's
//! name in convflow's one escaping ([`crate::names`]), so any Unix name
//! survives (a manifest of earlier versions, raw bytes with `\\` and `\n`
//! escaped, reads the same). `manifest.idx`: the byte offset (u64 little-endian) of every
//! [`INDEX_EVERY`]th line.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.tsv";
pub const INDEX: &str = "manifest.idx";
pub const INDEX_EVERY: u64 = 1024;

/// One item of the listing, as indices into the plan's splits and classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub split: Option<u32>,
    pub label: Option<u32>,
    pub path: PathBuf,
}

fn escape(path: &Path, out: &mut Vec<u8>) {
    out.extend_from_slice(crate::names::escape_path(path).as_bytes());
}

fn unescape(bytes: &[u8]) -> Result<PathBuf, String> {
    crate::names::unescape_path(bytes)
}

fn index_field(v: Option<u32>, out: &mut Vec<u8>) {
    match v {
        Some(i) => out.extend_from_slice(i.to_string().as_bytes()),
        None => out.push(b'-'),
    }
}

/// Writes `manifest.tsv` and `manifest.idx` into `dir`, synced; returns the
/// number of entries and the blake3 of `manifest.tsv`.
pub fn write(dir: &Path, entries: impl IntoIterator<Item = ManifestEntry>) -> std::io::Result<(u64, String)> {
    let mut tsv = BufWriter::with_capacity(1 << 20, File::create(dir.join(MANIFEST))?);
    let mut idx = BufWriter::new(File::create(dir.join(INDEX))?);
    let mut hasher = blake3::Hasher::new();
    let (mut count, mut offset) = (0u64, 0u64);
    let mut line = Vec::new();
    for e in entries {
        if count.is_multiple_of(INDEX_EVERY) {
            idx.write_all(&offset.to_le_bytes())?;
        }
        line.clear();
        index_field(e.split, &mut line);
        line.push(b'\t');
        index_field(e.label, &mut line);
        line.push(b'\t');
        escape(&e.path, &mut line);
        line.push(b'\n');
        tsv.write_all(&line)?;
        hasher.update(&line);
        offset += line.len() as u64;
        count += 1;
    }
    for w in [tsv, idx] {
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    Ok((count, hasher.finalize().to_hex().to_string()))
}

/// Entries `[start, end)`, reading only the index and those lines.
pub fn read_range(dir: &Path, start: u64, end: u64) -> Result<Vec<ManifestEntry>, String> {
    let path = dir.join(MANIFEST);
    let named = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    if start >= end {
        return Ok(Vec::new());
    }
    let block = start / INDEX_EVERY;
    let mut idx = File::open(dir.join(INDEX)).map_err(|e| format!("{}: {e}", dir.join(INDEX).display()))?;
    idx.seek(SeekFrom::Start(block * 8)).map_err(|e| named(&e))?;
    let mut offset = [0u8; 8];
    idx.read_exact(&mut offset)
        .map_err(|e| format!("{}: entry {start} is past the end: {e}", dir.join(INDEX).display()))?;
    let mut tsv = BufReader::with_capacity(1 << 20, File::open(&path).map_err(|e| named(&e))?);
    tsv.seek(SeekFrom::Start(u64::from_le_bytes(offset))).map_err(|e| named(&e))?;
    let mut out = Vec::with_capacity((end - start) as usize);
    let mut line = Vec::new();
    for n in block * INDEX_EVERY..end {
        line.clear();
        if tsv.read_until(b'\n', &mut line).map_err(|e| named(&e))? == 0 || line.pop() != Some(b'\n') {
            return Err(named(&format!("ends before entry {n} (the plan asked for entries up to {end})")));
        }
        if n < start {
            continue;
        }
        let bad = |m: &str| named(&format!("entry {n}: {m}"));
        let mut fields = line.splitn(3, |&b| b == b'\t');
        let mut index = |what: &str| -> Result<Option<u32>, String> {
            match fields.next() {
                Some(b"-") => Ok(None),
                Some(f) => std::str::from_utf8(f)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .map(Some)
                    .ok_or_else(|| bad(&format!("bad {what} index"))),
                None => Err(bad(&format!("no {what} field"))),
            }
        };
        let split = index("split")?;
        let label = index("label")?;
        let path = unescape(fields.next().ok_or_else(|| bad("no path"))?).map_err(|m| bad(&m))?;
        out.push(ManifestEntry { split, label, path });
    }
    Ok(out)
}

/// The escaped form `feature_writer` gives a path in `paths.txt`, to match
/// its rows back to manifest entries.
pub fn paths_txt_form(path: &Path) -> Vec<u8> {
    crate::names::escape_path(path).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn ranges_read_back_exactly_with_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let odd = [
            PathBuf::from("a/plain.jpg"),
            PathBuf::from("a/new\nline.jpg"),
            PathBuf::from("a/back\\slash\\n.jpg"),
            PathBuf::from("a/tab\there.jpg"),
            PathBuf::from(std::ffi::OsString::from_vec(b"a/latin1-\xe9.jpg".to_vec())),
        ];
        let entries: Vec<ManifestEntry> = (0..3000u32)
            .map(|i| ManifestEntry {
                split: (i % 3 != 0).then_some(i % 3),
                label: (i % 2 == 0).then_some(i % 2),
                path: if i < 5 { odd[i as usize].clone() } else { PathBuf::from(format!("d/{i}.jpg")) },
            })
            .collect();
        let (n, hash) = write(dir.path(), entries.clone()).unwrap();
        assert_eq!(n, 3000);
        assert_eq!(hash, blake3::hash(&std::fs::read(dir.path().join(MANIFEST)).unwrap()).to_hex().to_string());
        assert_eq!(std::fs::metadata(dir.path().join(INDEX)).unwrap().len(), 3 * 8, "one offset per 1024 lines");
        for (a, b) in [(0, 5), (0, 3000), (1023, 1025), (2047, 2048), (2999, 3000), (7, 7)] {
            assert_eq!(read_range(dir.path(), a, b).unwrap(), entries[a as usize..b as usize], "[{a}, {b})");
        }
        let err = read_range(dir.path(), 2990, 3001).unwrap_err();
        assert!(err.contains("manifest.tsv: ends before entry 3000"), "{err}");
        assert!(read_range(dir.path(), 5000, 5001).unwrap_err().contains("manifest.idx: entry 5000 is past the end"));
    }
}
