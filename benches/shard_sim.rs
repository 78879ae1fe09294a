//! A simulation of a sharded run at scale, on generated features (no model,
//! no images): the per-shard costs that do not depend on the model, and the
//! merge's rate and memory. Run on purpose, not by `cargo test`:
//!
//!   cargo bench --bench shard_sim -- manifest DIR ITEMS SHARDS
//!       writes a manifest of ITEMS entries, then times what one shard of
//!       SHARDS pays to find its range in it (the listing cost per shard)
//!   cargo bench --bench shard_sim -- parts DIR ROWS SHARDS DIM
//!       writes SHARDS published parts of ROWS rows in all, DIM floats a row
//!   /usr/bin/time -v target/release/deps/shard_sim-* merge DIR
//!       merges them and prints rows/s (peak RSS from time -v)

use std::path::{Path, PathBuf};
use std::time::Instant;

use convflow::npy::NpyWriter;
use convflow::shard::manifest::{self, ManifestEntry};
use convflow::shard::part::{self, PartMeta};
use convflow::shard::plan::{self, Plan};

fn arg(args: &[String], i: usize, what: &str) -> String {
    args.get(i).cloned().unwrap_or_else(|| panic!("missing argument {i}: {what}"))
}

fn path_of(i: u64) -> PathBuf {
    PathBuf::from(format!("/shared/photos/train/class-{}/img-{i:09}.jpg", i % 7))
}

fn sim_plan(items: u64, shards: u64) -> Plan {
    Plan {
        format: plan::FORMAT.into(),
        pipeline: "sim".into(),
        fingerprint: "f".repeat(64),
        pipeline_fingerprint: "p".repeat(64),
        manifest_blake3: "m".repeat(64),
        shards,
        items,
        source: "files".into(),
        sink: "write".into(),
        classes: (0..7).map(|c| format!("class-{c}")).collect(),
        class_mode: convflow::item::ClassMode::Categorical,
        splits: vec!["train".into()],
    }
}

fn manifest_sim(dir: &Path, items: u64, shards: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let t = Instant::now();
    let entries = (0..items).map(|i| ManifestEntry { split: Some(0), label: Some((i % 7) as u32), path: path_of(i) });
    let (n, _) = manifest::write(dir, entries).unwrap();
    let bytes = std::fs::metadata(dir.join(manifest::MANIFEST)).unwrap().len();
    println!("manifest: {n} entries, {:.1} MB, written in {:.2} s", bytes as f64 / 1e6, t.elapsed().as_secs_f64());
    for index in [0, shards / 2, shards - 1] {
        let (a, b) = convflow::shard::range(index, shards, items);
        let t = Instant::now();
        let got = manifest::read_range(dir, a, b).unwrap();
        assert_eq!(got.len() as u64, b - a);
        assert_eq!(got[0].path, path_of(a));
        println!("shard {index}/{shards}: read its {} entries in {:.2} ms", b - a, t.elapsed().as_secs_f64() * 1e3);
    }
}

fn parts_sim(dir: &Path, rows: u64, shards: u64, dim: usize) {
    let plan = sim_plan(rows, shards);
    std::fs::create_dir_all(Plan::parts_dir(dir)).unwrap();
    std::fs::write(dir.join(plan::PLAN), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let t = Instant::now();
    let classes = plan.classes.join("\n") + "\n";
    for s in 0..shards {
        let (a, b) = convflow::shard::range(s, shards, rows);
        let target = part::part_dir(dir, s, shards);
        let out = target.join(part::OUT).join("train");
        std::fs::create_dir_all(&out).unwrap();
        let mut f = NpyWriter::create(&out.join("features.npy"), &[dim]).unwrap();
        let mut l = NpyWriter::create(&out.join("labels.npy"), &[7]).unwrap();
        let mut paths = Vec::new();
        let mut positions = Vec::new();
        let mut row = vec![0f32; dim];
        for i in a..b {
            row.iter_mut().enumerate().for_each(|(k, x)| *x = (i as f32) + k as f32 * 1e-3);
            f.push(&row).unwrap();
            let mut one_hot = [0f32; 7];
            one_hot[(i % 7) as usize] = 1.0;
            l.push(&one_hot).unwrap();
            paths.extend_from_slice(path_of(i).to_string_lossy().as_bytes());
            paths.push(b'\n');
            positions.extend_from_slice(&i.to_le_bytes());
        }
        f.finish().unwrap();
        l.finish().unwrap();
        std::fs::write(out.join("paths.txt"), &paths).unwrap();
        std::fs::write(out.join("classes.txt"), &classes).unwrap();
        std::fs::write(out.join(part::POSITIONS), &positions).unwrap();
        std::fs::write(target.join(part::REPORT), r#"{"wall_seconds": 1.0, "stages": [], "skipped": []}"#).unwrap();
        let meta = PartMeta {
            format: part::FORMAT.into(),
            fingerprint: plan.fingerprint.clone(),
            shard: s,
            shards,
            start: a,
            end: b,
            outputs: [("train".to_string(), b - a)].into(),
            skipped: Vec::new(),
        };
        std::fs::write(target.join(part::MARKER), serde_json::to_string(&meta).unwrap()).unwrap();
    }
    println!("{shards} parts, {rows} rows of {dim} floats written in {:.1} s", t.elapsed().as_secs_f64());
}

fn merge_sim(dir: &Path) {
    let plan = Plan::load(dir).unwrap();
    let dest = dir.join("merged");
    let t = Instant::now();
    let (summary, _) = convflow::shard::merge::merge_into(&plan, dir, &dest).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let rows: u64 = summary.rows.values().sum();
    println!(
        "merged {} parts, {rows} rows, {:.1} MB in {secs:.2} s: {:.0} rows/s, {:.0} MB/s",
        summary.parts,
        summary.bytes as f64 / 1e6,
        rows as f64 / secs,
        summary.bytes as f64 / 1e6 / secs
    );
    let (shape, _) = convflow::npy::read_header(&dest.join("train/features.npy")).unwrap();
    assert_eq!(shape[0] as u64, rows);
}

fn main() {
    // `cargo bench` adds `--bench`; drop flags.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let dir = PathBuf::from(arg(&args, 1, "DIR"));
    let num = |i: usize, what: &str| arg(&args, i, what).parse::<u64>().unwrap();
    match args.first().map(String::as_str) {
        Some("manifest") => manifest_sim(&dir, num(2, "ITEMS"), num(3, "SHARDS")),
        Some("parts") => parts_sim(&dir, num(2, "ROWS"), num(3, "SHARDS"), num(4, "DIM") as usize),
        Some("merge") => merge_sim(&dir),
        _ => eprintln!("usage: shard_sim manifest DIR ITEMS SHARDS | parts DIR ROWS SHARDS DIM | merge DIR"),
    }
}
