//! `convflow merge FILE --plan DIR`: checks that every part of the plan is
//! there, carries the plan's fingerprint and covers its range exactly once,
//! then streams the final files in global order. Parts are contiguous
//! ranges, so global order is shard order: one part is open at a time and
//! the data is copied through a fixed buffer; memory does not grow with the
//! data, only (one bit per position) with the largest part.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::part::{self, MARKER, OUT, POSITIONS, PartMeta};
use super::plan::{Plan, PlanError, short};
use crate::graph::Graph;
use crate::npy::NpyWriter;
use crate::stages::feature_writer::FILES;

/// The copy buffer: the merge's memory, whatever the data's size.
const CHUNK: usize = 4 << 20;

fn io_err(path: &Path, e: impl std::fmt::Display) -> PlanError {
    PlanError::Io { path: path.to_path_buf(), message: e.to_string() }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    pub parts: u64,
    /// Rows per output folder.
    pub rows: BTreeMap<String, u64>,
    pub skipped: u64,
    pub bytes: u64,
}

/// Every part's marker, in shard order, after checking they are all there,
/// all of this plan, and nothing else is in the parts folder.
fn markers(plan: &Plan, plan_dir: &Path) -> Result<Vec<(PathBuf, PartMeta)>, PlanError> {
    let parts_dir = Plan::parts_dir(plan_dir);
    let mut expected: std::collections::BTreeSet<String> = Default::default();
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for i in 0..plan.shards {
        let dir = part::part_dir(plan_dir, i, plan.shards);
        expected.insert(super::part_name(i, plan.shards));
        match part::read_marker(&dir)? {
            None => missing.push(dir),
            Some(meta) => {
                let (start, end) = super::range(i, plan.shards, plan.items);
                if meta.fingerprint != plan.fingerprint {
                    return Err(part::foreign(&dir, &meta, plan));
                }
                if (meta.shard, meta.shards, meta.start, meta.end) != (i, plan.shards, start, end) {
                    return Err(io_err(
                        &dir.join(MARKER),
                        format!(
                            "foreign part: it says shard {}/{} over [{}, {}), the plan's shard {i} is [{start}, {end})",
                            meta.shard, meta.shards, meta.start, meta.end
                        ),
                    ));
                }
                found.push((dir, meta));
            }
        }
    }
    if !missing.is_empty() {
        let shown: Vec<String> = missing.iter().take(10).map(|p| p.display().to_string()).collect();
        let more = if missing.len() > 10 { format!(" and {} more", missing.len() - 10) } else { String::new() };
        return Err(PlanError::Other(format!(
            "{} of {} parts missing (their shards have not finished; rerun them): {}{more}",
            missing.len(),
            plan.shards,
            shown.join(", ")
        )));
    }
    for e in std::fs::read_dir(&parts_dir).map_err(|e| io_err(&parts_dir, e))? {
        let name = e.map_err(|e| io_err(&parts_dir, e))?.file_name().to_string_lossy().into_owned();
        // Hidden entries are the staging folders of attempts that died.
        if !name.starts_with('.') && !expected.contains(&name) {
            return Err(io_err(
                &parts_dir.join(&name),
                format!("foreign part: not one of this plan's {} parts (part-*-of-{:05})", plan.shards, plan.shards),
            ));
        }
    }
    Ok(found)
}

/// Checks that a part's rows and skipped items hold each position of its
/// range exactly once, and that each output's files agree on its row count.
fn check_part(dir: &Path, meta: &PartMeta) -> Result<(), PlanError> {
    let range = (meta.end - meta.start) as usize;
    let mut seen = vec![false; range];
    let mut take = |p: u64, what: &Path| -> Result<(), PlanError> {
        if p < meta.start || p >= meta.end {
            return Err(io_err(
                what,
                format!("position {p} is outside the part's range [{}, {})", meta.start, meta.end),
            ));
        }
        let slot = &mut seen[(p - meta.start) as usize];
        if *slot {
            return Err(io_err(what, format!("position {p} doubled")));
        }
        *slot = true;
        Ok(())
    };
    let out = dir.join(OUT);
    let folders = part::output_folders(&out).map_err(|e| io_err(&out, e))?;
    let listed: Vec<&String> = meta.outputs.keys().collect();
    if folders.iter().collect::<Vec<_>>() != listed {
        return Err(io_err(&dir.join(MARKER), format!("lists outputs {listed:?}, the part holds {folders:?}")));
    }
    for (name, &rows) in &meta.outputs {
        let folder = part::output_path(&out, name);
        let pos_path = folder.join(POSITIONS);
        let bytes = std::fs::read(&pos_path).map_err(|e| io_err(&pos_path, e))?;
        if bytes.len() as u64 != 8 * rows {
            return Err(io_err(&pos_path, format!("{} positions, part.json says {rows} rows", bytes.len() / 8)));
        }
        let mut last = None;
        for c in bytes.chunks_exact(8) {
            let p = u64::from_le_bytes(c.try_into().unwrap_or_default());
            if last.is_some_and(|l| l >= p) {
                return Err(io_err(&pos_path, format!("position {p} out of order")));
            }
            last = Some(p);
            take(p, &pos_path)?;
        }
        for file in ["features.npy", "labels.npy"] {
            let path = folder.join(file);
            if file == "labels.npy" && !path.exists() {
                continue;
            }
            let (shape, _) = crate::npy::read_header(&path).map_err(|e| io_err(&path, e))?;
            if shape.first().copied() != Some(rows as usize) {
                return Err(io_err(&path, format!("shape {shape:?}, but the part has {rows} rows")));
            }
        }
    }
    for &p in &meta.skipped {
        take(p, &dir.join(MARKER))?;
    }
    if let Some(n) = seen.iter().position(|s| !s) {
        return Err(io_err(
            &dir.join(MARKER),
            format!("position {} is missing: neither a row nor a skipped item", meta.start + n as u64),
        ));
    }
    Ok(())
}

/// Appends the data section of the `.npy` at `path` to `into`.
fn copy_npy(path: &Path, into: &mut Option<NpyWriter>, target: &Path, buf: &mut [u8]) -> Result<u64, PlanError> {
    let (shape, offset) = crate::npy::read_header(path).map_err(|e| io_err(path, e))?;
    let writer = match into {
        Some(w) if w.row_shape() != &shape[1..] => {
            return Err(io_err(
                path,
                format!("rows of shape {:?}, earlier parts' are {:?}", &shape[1..], w.row_shape()),
            ));
        }
        Some(w) => w,
        None => into.insert(NpyWriter::create(target, &shape[1..]).map_err(|e| io_err(target, e))?),
    };
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| io_err(path, e))?;
    let row_bytes = 4 * shape[1..].iter().product::<usize>();
    // Whole rows per write, so push_raw never sees a torn one.
    let chunk = (buf.len() / row_bytes.max(1)).max(1) * row_bytes;
    let mut copied = 0u64;
    let mut pending = 0usize;
    let mut big = Vec::new();
    let buf: &mut [u8] = if chunk <= buf.len() {
        &mut buf[..chunk]
    } else {
        big.resize(chunk, 0);
        &mut big
    };
    loop {
        let n = f.read(&mut buf[pending..]).map_err(|e| io_err(path, e))?;
        pending += n;
        if pending == buf.len() || (n == 0 && pending > 0) {
            writer.push_raw(&buf[..pending]).map_err(|e| io_err(path, e))?;
            copied += pending as u64;
            pending = 0;
        }
        if n == 0 {
            break;
        }
    }
    Ok(copied)
}

/// Writes one output folder (`""`: the writer's folder) from every part
/// that has it, in shard order, into `work` (a folder of the claimed
/// output's new version); returns (rows, bytes).
fn merge_output(
    name: &str,
    parts: &[(PathBuf, PartMeta)],
    work: &Path,
    buf: &mut [u8],
) -> Result<(u64, u64), PlanError> {
    std::fs::create_dir_all(work).map_err(|e| io_err(work, e))?;
    let mut features = None;
    let mut labels = None;
    let paths_partial = work.join("paths.txt.partial");
    let mut paths =
        std::io::BufWriter::new(std::fs::File::create(&paths_partial).map_err(|e| io_err(&paths_partial, e))?);
    let mut classes: Option<(PathBuf, Vec<u8>)> = None;
    let mut bytes = 0;
    let mut rows = 0;
    for (dir, meta) in parts.iter().filter(|(_, m)| m.outputs.contains_key(name)) {
        let folder = part::output_path(&dir.join(OUT), name);
        bytes += copy_npy(&folder.join("features.npy"), &mut features, &work.join("features.npy"), buf)?;
        let label_file = folder.join("labels.npy");
        if label_file.exists() {
            bytes += copy_npy(&label_file, &mut labels, &work.join("labels.npy"), buf)?;
        }
        let p = folder.join("paths.txt");
        let mut f = std::fs::File::open(&p).map_err(|e| io_err(&p, e))?;
        bytes += std::io::copy(&mut f, &mut paths).map_err(|e| io_err(&p, e))?;
        let c = folder.join("classes.txt");
        if let Ok(text) = std::fs::read(&c) {
            match &classes {
                Some((first, t)) if *t != text => {
                    return Err(io_err(&c, format!("classes differ from {}", first.display())));
                }
                Some(_) => {}
                None => classes = Some((c, text)),
            }
        }
        rows += meta.outputs[name];
    }
    let written = features.ok_or_else(|| PlanError::Other(format!("output `{name}`: no part has rows")))?;
    written.finish().map_err(|e| io_err(&work.join("features.npy"), e))?;
    if let Some(l) = labels {
        l.finish().map_err(|e| io_err(&work.join("labels.npy"), e))?;
    }
    let file = paths.into_inner().map_err(|e| io_err(&paths_partial, e.into_error()))?;
    file.sync_all().map_err(|e| io_err(&paths_partial, e))?;
    std::fs::rename(&paths_partial, work.join("paths.txt")).map_err(|e| io_err(&paths_partial, e))?;
    if let Some((_, text)) = classes {
        std::fs::write(work.join("classes.txt"), text).map_err(|e| io_err(&work.join("classes.txt"), e))?;
    }
    Ok((rows, bytes))
}

/// Checks every part, then writes the final files into the pipeline's
/// `feature_writer` folder and the merged report where the pipeline (and
/// `extra_report`) says.
pub fn merge(
    graph: &Graph,
    plan: &Plan,
    plan_dir: &Path,
    extra_report: Option<&Path>,
) -> Result<MergeSummary, PlanError> {
    plan.check(graph, plan_dir)?;
    let (_, sink) = super::plan::shardable(graph)?;
    let sink_options: Value = serde_json::from_str(&graph.stages[sink].config.canonical_json())
        .map_err(|e| PlanError::Other(e.to_string()))?;
    let dest = PathBuf::from(sink_options["dir"].as_str().unwrap_or_default());
    let (summary, parts) = merge_into(plan, plan_dir, &dest)?;
    let report = merged_report(graph, plan, &parts, &summary)?;
    let text = serde_json::to_string_pretty(&report).map_err(|e| PlanError::Other(e.to_string()))? + "\n";
    for path in graph.report.iter().map(PathBuf::as_path).chain(extra_report) {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
        }
        std::fs::write(path, &text).map_err(|e| io_err(path, e))?;
    }
    Ok(summary)
}

/// The data half of [`merge`] (no pipeline needed: the plan says it all):
/// checks every part, then writes the output folders into `dest`.
pub fn merge_into(
    plan: &Plan,
    plan_dir: &Path,
    dest: &Path,
) -> Result<(MergeSummary, Vec<(PathBuf, PartMeta)>), PlanError> {
    let parts = markers(plan, plan_dir)?;
    for (dir, meta) in &parts {
        check_part(dir, meta)?;
    }
    let names: std::collections::BTreeSet<&String> = parts.iter().flat_map(|(_, m)| m.outputs.keys()).collect();
    // Claimed before any data is copied, and published at once, as the
    // feature_writer does (crate::publish).
    let entries: Vec<std::ffi::OsString> = names
        .iter()
        .flat_map(|n| if n.is_empty() { FILES.to_vec() } else { vec![n.as_str()] })
        .map(Into::into)
        .collect();
    let output = crate::publish::Output::claim(dest, &entries).map_err(PlanError::Other)?;
    let mut buf = vec![0u8; CHUNK];
    let mut summary = MergeSummary {
        parts: parts.len() as u64,
        rows: BTreeMap::new(),
        skipped: parts.iter().map(|(_, m)| m.skipped.len() as u64).sum(),
        bytes: 0,
    };
    for name in names {
        let (rows, bytes) = merge_output(name, &parts, &part::output_path(output.staging(), name), &mut buf)?;
        let shown = part::output_path(dest, name).display().to_string();
        summary.rows.insert(shown, rows);
        summary.bytes += bytes;
    }
    output.publish().map_err(PlanError::Other)?;
    Ok((summary, parts))
}

fn add(into: &mut Value, key: &str, v: &Value) {
    let sum = into[key].as_f64().unwrap_or(0.0) + v.as_f64().unwrap_or(0.0);
    into[key] = if v.is_u64() && into[key].is_u64() | into[key].is_null() {
        json!(into[key].as_u64().unwrap_or(0) + v.as_u64().unwrap_or(0))
    } else {
        json!(sum)
    };
}

/// The shards' reports as one: counts and seconds added per stage, cache
/// counts added, skipped items in global order, each shard's wall time.
fn merged_report(
    graph: &Graph,
    plan: &Plan,
    parts: &[(PathBuf, PartMeta)],
    summary: &MergeSummary,
) -> Result<Value, PlanError> {
    const SUMMED: &[&str] = &[
        "items_in",
        "items_out",
        "item_errors",
        "busy_seconds",
        "waiting_for_input_seconds",
        "blocked_on_output_seconds",
    ];
    let mut stages: Vec<Value> = Vec::new();
    let mut cache = json!({});
    let mut skipped = Vec::new();
    let mut shards = Vec::new();
    let mut wall_sum = 0.0;
    let mut wall_max: f64 = 0.0;
    for (dir, meta) in parts {
        let path = dir.join(part::REPORT);
        let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        let r: Value = serde_json::from_str(&text).map_err(|e| io_err(&path, e))?;
        let wall = r["wall_seconds"].as_f64().unwrap_or(0.0);
        wall_sum += wall;
        wall_max = wall_max.max(wall);
        for s in r["stages"].as_array().into_iter().flatten() {
            let slot = match stages.iter_mut().position(|x| x["id"] == s["id"]) {
                Some(i) => &mut stages[i],
                None => {
                    stages.push(json!({ "id": s["id"], "kind": s["kind"] }));
                    let n = stages.len() - 1;
                    &mut stages[n]
                }
            };
            for k in SUMMED {
                add(slot, k, &s[*k]);
            }
        }
        if r["cache"].is_object() {
            for k in ["hits", "misses", "writes"] {
                add(&mut cache, k, &r["cache"][k]);
            }
            if r["cache"]["shared"].is_object() {
                let mut shared = cache["shared"].take();
                for k in ["hits", "writes", "errors", "rejected"] {
                    add(&mut shared, k, &r["cache"]["shared"][k]);
                }
                cache["shared"] = shared;
            }
        }
        for s in r["skipped"].as_array().into_iter().flatten() {
            let mut s = s.clone();
            s["shard"] = json!(meta.shard);
            skipped.push(s);
        }
        shards.push(json!({
            "shard": meta.shard, "start": meta.start, "end": meta.end, "rows": meta.outputs,
            "skipped": meta.skipped.len(), "wall_seconds": wall, "setup_seconds": r["setup_seconds"],
        }));
    }
    let cache = if cache.as_object().is_some_and(|m| !m.is_empty()) {
        let (h, m) = (cache["hits"].as_f64().unwrap_or(0.0), cache["misses"].as_f64().unwrap_or(0.0));
        cache["hit_pct"] = json!(if h + m > 0.0 { (1000.0 * h / (h + m)).round() / 10.0 } else { 0.0 });
        cache
    } else {
        Value::Null
    };
    Ok(json!({
        "pipeline": graph.name,
        "merged_from_shards": plan.shards,
        "fingerprint": short(&plan.fingerprint),
        "items": plan.items,
        "rows": summary.rows,
        "skipped_count": summary.skipped,
        "shard_wall_seconds_sum": wall_sum,
        "shard_wall_seconds_max": wall_max,
        "stages": stages,
        "cache": cache,
        "skipped": skipped,
        "shards": shards,
    }))
}

/// For the merge's progress line.
pub fn describe(summary: &MergeSummary) -> String {
    let rows: Vec<String> = summary.rows.iter().map(|(k, v)| format!("{k}: {v} rows")).collect();
    let mut s = format!("merged {} parts: {}", summary.parts, rows.join(", "));
    if summary.skipped > 0 {
        s += &format!("; {} items skipped (listed in the report)", summary.skipped);
    }
    s
}
