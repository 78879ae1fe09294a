//! File and folder names are bytes on Linux. Wherever convflow writes one
//! as a line of text (`paths.txt`, `classes.txt`, `skipped.csv`, the
//! manifest, the report), it writes it in this one escaping, which reads
//! back to the exact bytes:
//!
//! | byte(s) | written as |
//! | --- | --- |
//! | `\` | `\\` |
//! | newline, carriage return, tab | `\n`, `\r`, `\t` |
//! | a byte that is not part of valid UTF-8 | `\xHH` (two lowercase hex digits) |
//! | anything else | itself (UTF-8) |
//!
//! So every name is one line of valid UTF-8, whatever a text-mode reader
//! does with line endings. docs/extraction.md has a reader in Python.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// `bytes` in the escaping above.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A path in the escaping above.
pub fn escape_path(path: &Path) -> String {
    escape(path.as_os_str().as_bytes())
}

/// The bytes `escape` wrote.
pub fn unescape(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut it = text.iter();
    while let Some(&b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'\\') => out.push(b'\\'),
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'x') => {
                let hex = [it.next().copied(), it.next().copied()];
                let byte = match hex {
                    [Some(h), Some(l)] => {
                        std::str::from_utf8(&[h, l]).ok().and_then(|s| u8::from_str_radix(s, 16).ok())
                    }
                    _ => None,
                };
                out.push(byte.ok_or("bad escape `\\x`: expected two hex digits")?);
            }
            other => return Err(format!("bad escape `\\{}`", other.map(|&c| c as char).unwrap_or(' '))),
        }
    }
    Ok(out)
}

/// The path `escape_path` wrote.
pub fn unescape_path(text: &[u8]) -> Result<PathBuf, String> {
    unescape(text).map(|b| PathBuf::from(OsString::from_vec(b)))
}

/// Serializes a path as its escaped text (serde's own refuses a non-UTF-8 path).
pub fn serialize_path<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&escape_path(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_string_round_trips_and_stays_one_line_of_utf8() {
        let names: [&[u8]; 8] = [
            b"plain.jpg",
            b"new\nline.jpg",
            b"new\\nline.jpg",
            b"carriage\rreturn.jpg",
            b"tab\there,comma \"quoted\".jpg",
            b"latin1-caf\xe9.jpg",
            "ünïcødé ✓.jpg".as_bytes(),
            b"\xff\xfe\\x41\x00end",
        ];
        let mut lines = Vec::new();
        for name in names {
            let text = escape(name);
            assert!(!text.contains(['\n', '\r', '\t']), "{text}");
            assert_eq!(unescape(text.as_bytes()).unwrap(), name, "{text}");
            lines.push(text);
        }
        assert_ne!(lines[1], lines[2], "a newline and a backslash-n stay apart");
        assert_eq!(lines[5], "latin1-caf\\xe9.jpg");
        assert_eq!(lines[6], "ünïcødé ✓.jpg", "valid UTF-8 is written as is");
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(unescape(escape(&all).as_bytes()).unwrap(), all);
        assert!(unescape(b"bad\\q").is_err() && unescape(b"bad\\x4").is_err());
    }
}
