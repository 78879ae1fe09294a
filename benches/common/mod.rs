//! Helpers shared by the criterion benches: the images they run on.
#![allow(dead_code)]

pub mod convnets;

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `CONVFLOW_BENCH_DATA` (a folder of class folders), else the book's
/// training photos beside the checkout, else the small fixture images (a
/// fresh clone has no shared data; their figures are then not comparable).
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CONVFLOW_BENCH_DATA") {
        return PathBuf::from(d);
    }
    let shared = root().join("../shared/data/cats_and_dogs_small/train");
    if shared.is_dir() {
        return shared;
    }
    eprintln!("note: {} is missing; benchmarking the fixture images instead", shared.display());
    root().join("tests/fixtures/images")
}

/// The first `n` files (sorted) of the class folders of `dir`, classes
/// taking turns, as (path, bytes).
pub fn photos(dir: &Path, n: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let mut classes: Vec<Vec<PathBuf>> = Vec::new();
    let mut class_dirs: Vec<PathBuf> =
        std::fs::read_dir(dir).expect("data folder").flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    class_dirs.sort();
    for c in class_dirs {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&c).expect("class folder").flatten().map(|e| e.path()).collect();
        files.sort();
        classes.push(files);
    }
    let mut out = Vec::new();
    for i in 0.. {
        let before = out.len();
        for files in &classes {
            if let Some(f) = files.get(i)
                && out.len() < n
            {
                out.push((f.clone(), std::fs::read(f).expect("readable image")));
            }
        }
        if out.len() == n || out.len() == before {
            break;
        }
    }
    out
}

/// Copies `photos` into `dir/<class>/` so a pipeline can read exactly them.
pub fn copy_to(photos: &[(PathBuf, Vec<u8>)], dir: &Path) {
    for (path, bytes) in photos {
        let class = path.parent().and_then(|p| p.file_name()).expect("class folder");
        let name = path.file_name().expect("file name");
        std::fs::create_dir_all(dir.join(class)).expect("create class folder");
        std::fs::write(dir.join(class).join(name), bytes).expect("write image");
    }
}
