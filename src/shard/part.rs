//! One shard's output: the `feature_writer` files of its range, the global
//! position of every row, its run report, and `part.json`, the marker.
//!
//! A shard works in a hidden staging folder of its own
//! (`parts/.part-00003-of-00016.HOST-PID.tmp`) and publishes it with one
//! rename once every file, the marker last, is synced: `parts/part-...`
//! exists only complete. A shard whose part is already there with the
//! plan's fingerprint does nothing, so an engine's retries are safe; two
//! attempts racing write the same rows and the second rename loses, which
//! is fine.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest;
use super::plan::{Plan, PlanError, short};
use crate::graph::Graph;

pub const MARKER: &str = "part.json";
pub const POSITIONS: &str = "positions.u64";
/// The `feature_writer`'s folder inside a part.
pub const OUT: &str = "out";
pub const REPORT: &str = "report.json";
pub const FORMAT: &str = "convflow-part/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartMeta {
    pub format: String,
    pub fingerprint: String,
    pub shard: u64,
    pub shards: u64,
    pub start: u64,
    pub end: u64,
    /// Rows per output folder (`""`: the writer's folder itself, else a split).
    pub outputs: BTreeMap<String, u64>,
    /// Positions in the range that produced no row (skipped items, each
    /// named in the part's report).
    pub skipped: Vec<u64>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> PlanError {
    PlanError::Io { path: path.to_path_buf(), message: e.to_string() }
}

/// Writes `path` through a temporary sibling, synced, then renamed.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The marker of a published part, if there is one.
pub fn read_marker(part_dir: &Path) -> Result<Option<PartMeta>, PlanError> {
    let path = part_dir.join(MARKER);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| io_err(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path, e)),
    }
}

pub fn part_dir(plan_dir: &Path, index: u64, count: u64) -> PathBuf {
    Plan::parts_dir(plan_dir).join(super::part_name(index, count))
}

/// A shard's answer before any work.
pub enum Prepared {
    /// Its part is already published with the plan's fingerprint.
    Done(PathBuf),
    /// The graph now reads the shard's range and writes into the staging folder.
    Run(Staging),
}

/// Checks the plan against the pipeline and this shard, and points the
/// graph's source at the shard's range and its writer at a staging folder.
pub fn prepare(graph: &mut Graph, plan: &Plan, plan_dir: &Path, index: u64, count: u64) -> Result<Prepared, PlanError> {
    plan.check(graph, plan_dir)?;
    if count != plan.shards {
        return Err(PlanError::Other(format!(
            "shard {index}/{count}: the plan in {} is for {} shards; run --shard I/{} (or plan again)",
            plan_dir.display(),
            plan.shards,
            plan.shards
        )));
    }
    let target = part_dir(plan_dir, index, count);
    if let Some(meta) = read_marker(&target)? {
        if meta.fingerprint == plan.fingerprint {
            return Ok(Prepared::Done(target));
        }
        return Err(foreign(&target, &meta, plan));
    }
    let host = hostname();
    let dir = Plan::parts_dir(plan_dir).join(format!(
        ".{}.{host}-{}.tmp",
        super::part_name(index, count),
        std::process::id()
    ));
    if dir.exists() {
        // Only a dead process with this host and pid can have left it.
        std::fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let input = plan.shard_input(plan_dir, index);
    super::plan::shardable(graph)?;
    graph.report = Some(dir.join(REPORT));
    Ok(Prepared::Run(Staging {
        dir,
        target,
        fingerprint: plan.fingerprint.clone(),
        index,
        count,
        input,
        published: false,
    }))
}

pub fn foreign(target: &Path, meta: &PartMeta, plan: &Plan) -> PlanError {
    PlanError::Other(format!(
        "{} is a foreign part: fingerprint {} (shard {}/{}), but the plan's is {}; it belongs to another run: \
         remove it, or use that run's plan folder",
        target.display(),
        short(&meta.fingerprint),
        meta.shard,
        meta.shards,
        short(&plan.fingerprint)
    ))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // or truncates within it.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect();
    if ok && !name.is_empty() { name } else { "host".into() }
}

/// A shard's work in progress; removed unless published.
pub struct Staging {
    dir: PathBuf,
    target: PathBuf,
    fingerprint: String,
    index: u64,
    count: u64,
    input: super::ShardInput,
    published: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Folders of `out` that hold a writer's files: `""` for `out` itself.
pub fn output_folders(out: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    if out.join("features.npy").is_file() {
        names.push(String::new());
    }
    if out.is_dir() {
        for e in std::fs::read_dir(out)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && e.path().join("features.npy").is_file() {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

pub fn output_path(out: &Path, name: &str) -> PathBuf {
    if name.is_empty() { out.to_path_buf() } else { out.join(name) }
}

impl Staging {
    /// What the run of this shard gives its stages: the source's range of
    /// the plan's listing, and the staging folder the sink writes into.
    pub fn shard_run(&self) -> Result<crate::stage::ShardRun, PlanError> {
        let items = super::plan::read_listing(&self.input).map_err(PlanError::Other)?;
        Ok(crate::stage::ShardRun { items, out_dir: self.dir.join(OUT) })
    }

    /// Records every row's position, writes the marker last and renames
    /// the staging folder into place.
    pub fn publish(mut self) -> Result<PathBuf, PlanError> {
        let entries =
            manifest::read_range(&self.input.plan_dir, self.input.start, self.input.end).map_err(PlanError::Other)?;
        let by_path: HashMap<Vec<u8>, u64> = entries
            .iter()
            .enumerate()
            .map(|(n, e)| (manifest::paths_txt_form(&e.path), self.input.start + n as u64))
            .collect();
        let range = (self.input.end - self.input.start) as usize;
        let mut seen = vec![false; range];
        let out = self.dir.join(OUT);
        let mut outputs = BTreeMap::new();
        for name in output_folders(&out).map_err(|e| io_err(&out, e))? {
            let folder = output_path(&out, &name);
            let paths = folder.join("paths.txt");
            let reader = std::io::BufReader::new(std::fs::File::open(&paths).map_err(|e| io_err(&paths, e))?);
            let mut positions = Vec::new();
            for line in reader.split(b'\n') {
                let line = line.map_err(|e| io_err(&paths, e))?;
                let Some(&p) = by_path.get(&line) else {
                    let shown = String::from_utf8_lossy(&line).into_owned();
                    return Err(io_err(
                        &paths,
                        format!("row {}: `{shown}` is not in this shard's range", positions.len()),
                    ));
                };
                let slot = &mut seen[(p - self.input.start) as usize];
                if *slot || positions.last().is_some_and(|&last| last >= p) {
                    return Err(io_err(
                        &paths,
                        format!("row {}: position {p} doubled or out of order", positions.len()),
                    ));
                }
                *slot = true;
                positions.push(p);
            }
            let bytes: Vec<u8> = positions.iter().flat_map(|p| p.to_le_bytes()).collect();
            let pos_path = folder.join(POSITIONS);
            write_synced(&pos_path, &bytes).map_err(|e| io_err(&pos_path, e))?;
            sync_dir(&folder).map_err(|e| io_err(&folder, e))?;
            outputs.insert(name, positions.len() as u64);
        }
        let skipped: Vec<u64> =
            seen.iter().enumerate().filter(|(_, s)| !**s).map(|(n, _)| self.input.start + n as u64).collect();
        let meta = PartMeta {
            format: FORMAT.into(),
            fingerprint: self.fingerprint.clone(),
            shard: self.index,
            shards: self.count,
            start: self.input.start,
            end: self.input.end,
            outputs,
            skipped,
        };
        let text = serde_json::to_string_pretty(&meta).map_err(|e| PlanError::Other(e.to_string()))? + "\n";
        let marker = self.dir.join(MARKER);
        write_synced(&marker, text.as_bytes()).map_err(|e| io_err(&marker, e))?;
        sync_dir(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        match std::fs::rename(&self.dir, &self.target) {
            Ok(()) => self.published = true,
            // Another attempt of this shard published first: same rows, keep theirs.
            Err(_) if read_marker(&self.target)?.is_some_and(|m| m.fingerprint == self.fingerprint) => {}
            Err(e) => return Err(io_err(&self.target, format!("cannot publish {}: {e}", self.dir.display()))),
        }
        let parts = self.target.parent().unwrap_or(Path::new("."));
        sync_dir(parts).map_err(|e| io_err(parts, e))?;
        Ok(self.target.clone())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
