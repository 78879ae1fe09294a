//! Pipeline YAML -> typed, positioned config.
//!
//! Every problem is collected (not just the first), each with file,
//! line:col, stage id and field, so one `convflow validate` shows them all.

pub mod params;
pub mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use yaml::{Node, Pos};

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub pos: Pos,
    pub stage: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.pos)?;
        if let Some(stage) = &self.stage {
            write!(f, "stage `{stage}`: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// All problems found in a file; the run stops before any work if non-empty.
#[derive(Debug, Clone, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        write!(f, "{} error{} in pipeline", self.0.len(), if self.0.len() == 1 { "" } else { "s" })
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Count, list and skip the bad item.
    #[default]
    Skip,
    /// Stop the run at the first bad item.
    Fail,
}

/// A stage as written, before its kind-specific options are typed.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub id: String,
    pub pos: Pos,
    pub kind: String,
    pub kind_pos: Pos,
    pub inputs: Vec<(String, Pos)>,
    pub workers: usize,
    /// `workers: auto`, kept so a stage that runs as one copy refuses it on
    /// every machine, not only on those with more than one core.
    pub workers_auto: bool,
    pub channel_capacity: Option<usize>,
    pub on_error: OnError,
    /// The kind-specific options: a mapping node holding only those keys.
    pub options: Node,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub file: PathBuf,
    pub name: String,
    pub description: Option<String>,
    /// Default capacity of every edge, in items.
    pub channel_capacity: usize,
    /// Where the run report (JSON) goes, if anywhere.
    pub report: Option<PathBuf>,
    /// `metrics: {listen: ADDR, linger: SECONDS}`: serve Prometheus metrics.
    pub metrics: MetricsConfig,
    pub params: Vec<(String, String)>,
    pub stages: Vec<StageSpec>,
    /// Problems found so far; graph validation adds its own and reports
    /// them all together.
    pub errors: Vec<ConfigError>,
}

/// The pipeline's `metrics:` key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsConfig {
    /// Serve `/metrics` here (`127.0.0.1:9184`); absent or empty: not served.
    pub listen: Option<std::net::SocketAddr>,
    /// Keep serving this long after the run ends, so a scraper sees the
    /// final values.
    pub linger: std::time::Duration,
}

pub const DEFAULT_CHANNEL_CAPACITY: usize = 4;
const TOP_LEVEL_KEYS: &[&str] = &["name", "description", "params", "channel_capacity", "report", "metrics", "stages"];
const METRICS_KEYS: &[&str] = &["listen", "linger"];
const COMMON_STAGE_KEYS: &[&str] = &["id", "kind", "input", "inputs", "workers", "channel_capacity", "on_error"];

struct Collector<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Collector<'_> {
    fn push(&mut self, pos: Pos, stage: Option<&str>, field: Option<&str>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            pos,
            stage: stage.map(str::to_string),
            field: field.map(str::to_string),
            message: message.into(),
        });
    }
}

/// Reads a pipeline file and applies `--set name=value` overrides.
pub fn load(file: &Path, overrides: &[(String, String)]) -> Result<PipelineConfig, ConfigErrors> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            pos: Pos { line: 1, col: 1 },
            stage: None,
            field: None,
            message: format!("cannot read pipeline file: {e}"),
        }])
    })?;
    parse_str(&text, file, overrides)
}

pub fn parse_str(text: &str, file: &Path, overrides: &[(String, String)]) -> Result<PipelineConfig, ConfigErrors> {
    let mut c = Collector { file, errors: Vec::new() };
    let mut root = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            c.push(e.pos, None, None, format!("YAML syntax: {}", e.message));
            return Err(ConfigErrors(c.errors));
        }
    };
    if root.as_map().is_none() {
        c.push(root.pos, None, None, "a pipeline file is a mapping with `stages:` (and optional `params:`)");
        return Err(ConfigErrors(c.errors));
    }

    for (k, _) in root.as_map().unwrap_or_default() {
        let key = k.as_str().unwrap_or_default();
        if !TOP_LEVEL_KEYS.contains(&key) {
            c.push(
                k.pos,
                None,
                Some(key),
                format!("unknown top-level key; expected one of {}", TOP_LEVEL_KEYS.join(", ")),
            );
        }
    }

    let params = params::collect(&root, overrides, &mut |pos, field, msg| c.push(pos, None, field, msg));
    params::substitute(&mut root, &params, &mut |pos, msg| c.push(pos, None, None, msg));

    let string_field = |c: &mut Collector, key: &str| -> Option<String> {
        let (_, v) = root.get(key)?;
        match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                c.push(v.pos, None, Some(key), "expected a string");
                None
            }
        }
    };
    let name = string_field(&mut c, "name").unwrap_or_else(|| {
        file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into())
    });
    let description = string_field(&mut c, "description");
    let report = string_field(&mut c, "report").filter(|s| !s.is_empty()).map(PathBuf::from);
    let channel_capacity = match root.get("channel_capacity") {
        Some((_, v)) => positive_int(&mut c, v, None, "channel_capacity").unwrap_or(DEFAULT_CHANNEL_CAPACITY),
        None => DEFAULT_CHANNEL_CAPACITY,
    };

    let metrics = match root.get("metrics") {
        Some((_, v)) => metrics_config(&mut c, v),
        None => MetricsConfig::default(),
    };

    let mut stages = Vec::new();
    match root.get("stages") {
        None => c.push(root.pos, None, Some("stages"), "missing `stages:` list"),
        Some((_, node)) => match &node.value {
            yaml::Value::Seq(items) if !items.is_empty() => {
                for item in items {
                    if let Some(spec) = stage_spec(&mut c, item) {
                        stages.push(spec);
                    }
                }
            }
            _ => c.push(node.pos, None, Some("stages"), "expected a non-empty list of stages"),
        },
    }

    Ok(PipelineConfig {
        file: file.to_path_buf(),
        name,
        description,
        channel_capacity,
        report,
        metrics,
        params: params.into_iter().map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string())).collect(),
        stages,
        errors: c.errors,
    })
}

fn metrics_config(c: &mut Collector, node: &Node) -> MetricsConfig {
    let mut m = MetricsConfig::default();
    let Some(entries) = node.as_map() else {
        c.push(node.pos, None, Some("metrics"), "expected a mapping, e.g. `metrics: {listen: \"127.0.0.1:9184\"}`");
        return m;
    };
    for (k, v) in entries {
        match k.as_str().unwrap_or_default() {
            "listen" => match v.as_str().map(str::trim) {
                Some("") => {}
                Some(s) => match s.parse() {
                    Ok(addr) => m.listen = Some(addr),
                    Err(_) => c.push(
                        v.pos,
                        None,
                        Some("metrics.listen"),
                        format!("`{s}` is not an address with a port, e.g. 127.0.0.1:9184"),
                    ),
                },
                None => c.push(v.pos, None, Some("metrics.listen"), "expected a string such as \"127.0.0.1:9184\""),
            },
            "linger" => match v.to_json().as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())) {
                Some(x) if x >= 0.0 && x.is_finite() => m.linger = std::time::Duration::from_secs_f64(x),
                _ => c.push(v.pos, None, Some("metrics.linger"), "expected seconds >= 0"),
            },
            other => c.push(
                k.pos,
                None,
                Some("metrics"),
                format!("unknown key `{other}`; expected one of {}", METRICS_KEYS.join(", ")),
            ),
        }
    }
    m
}

/// The cores of this machine, as far as this process may use them.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A `threads` option: 0 means one per core, shared out among `copies`
/// copies of the stage (at least one each); any other number is taken as it is.
pub fn threads(n: usize, copies: usize) -> usize {
    if n > 0 { n } else { (cores() / copies.max(1)).max(1) }
}

/// The most threads a setting may ask for: 16 per core of this machine (at
/// least 64). Each `workers` copy and each math thread is an OS thread (an
/// `exec` copy also a process); far past the cores they only cost memory,
/// and in the hundreds of thousands the OS refuses them mid-run.
pub fn max_threads() -> usize {
    (16 * cores()).max(64)
}

/// The most items an edge may hold. Each slot can hold an image or a batch
/// (megabytes), and the slots are allocated when the run starts.
pub const MAX_CHANNEL_CAPACITY: usize = 4096;

/// A thread count option (`0`: one per core) past [`max_threads`], as a
/// stage's `check` reports it.
pub fn threads_error(field: &str, n: usize) -> Option<crate::stage::FieldError> {
    let max = max_threads();
    (n > max).then(|| {
        crate::stage::FieldError::new(field, format!("{n} threads; at most {max} (16 per core of this machine)"))
    })
}

fn positive_int(c: &mut Collector, node: &Node, stage: Option<&str>, field: &str) -> Option<usize> {
    let why = "the slots are allocated when the run starts, and each can hold an image";
    whole_number(c, node, stage, field, "a whole number >= 1", (MAX_CHANNEL_CAPACITY, why))
}

/// A whole number from 1 to `max.0` (`max.1` says why there is a bound).
fn whole_number(
    c: &mut Collector,
    node: &Node,
    stage: Option<&str>,
    field: &str,
    expected: &str,
    max: (usize, &str),
) -> Option<usize> {
    match node.to_json().as_u64() {
        Some(n) if n >= 1 && n <= max.0 as u64 => Some(n as usize),
        Some(n) if n >= 1 => {
            c.push(node.pos, stage, Some(field), format!("{n} is too many: at most {} ({})", max.0, max.1));
            None
        }
        _ => {
            c.push(node.pos, stage, Some(field), format!("expected {expected}, found `{}`", node.to_json()));
            None
        }
    }
}

/// `workers: N`, or `auto`: one copy per core of this machine, so a decode
/// pool grows with the machine it runs on (16 decoders feeding one GPU).
/// Returns the count and whether it was `auto`.
fn workers(c: &mut Collector, node: &Node, stage: Option<&str>) -> Option<(usize, bool)> {
    if node.as_str() == Some("auto") {
        return Some((cores(), true));
    }
    let why = "16 per core of this machine: each copy is a thread";
    whole_number(c, node, stage, "workers", "a whole number >= 1 or `auto`", (max_threads(), why)).map(|n| (n, false))
}

fn stage_spec(c: &mut Collector, node: &Node) -> Option<StageSpec> {
    let Some(entries) = node.as_map() else {
        c.push(node.pos, None, None, "each stage is a mapping with at least `id` and `kind`");
        return None;
    };
    let id = match node.get("id") {
        Some((_, v)) => match v.as_str() {
            Some(s) if !s.is_empty() => Some(s.to_string()),
            _ => {
                c.push(v.pos, None, Some("id"), "expected a non-empty string");
                None
            }
        },
        None => {
            c.push(node.pos, None, Some("id"), "stage has no `id`");
            None
        }
    };
    let sid = id.as_deref();
    let (kind, kind_pos) = match node.get("kind") {
        Some((_, v)) => match v.as_str() {
            Some(s) if !s.is_empty() => (s.to_string(), v.pos),
            // An empty kind is no kind: the graph leaves it to this error.
            _ => {
                c.push(v.pos, sid, Some("kind"), "expected a stage kind (`convflow stages` lists them)");
                (String::new(), v.pos)
            }
        },
        None => {
            c.push(node.pos, sid, Some("kind"), "stage has no `kind`");
            (String::new(), node.pos)
        }
    };

    let mut inputs = Vec::new();
    if node.get("input").is_some() && node.get("inputs").is_some() {
        c.push(node.pos, sid, Some("inputs"), "give either `input` or `inputs`, not both");
    }
    for key in ["input", "inputs"] {
        if let Some((_, v)) = node.get(key) {
            match &v.value {
                yaml::Value::Scalar { text, .. } => inputs.push((text.clone(), v.pos)),
                yaml::Value::Seq(items) => {
                    for i in items {
                        match i.as_str() {
                            Some(s) => inputs.push((s.to_string(), i.pos)),
                            None => c.push(i.pos, sid, Some(key), "expected a stage id"),
                        }
                    }
                }
                yaml::Value::Map(_) => c.push(v.pos, sid, Some(key), "expected a stage id or a list of ids"),
            }
        }
    }

    let (workers, workers_auto) = node.get("workers").and_then(|(_, v)| workers(c, v, sid)).unwrap_or((1, false));
    let channel_capacity = node.get("channel_capacity").and_then(|(_, v)| positive_int(c, v, sid, "channel_capacity"));
    let on_error = match node.get("on_error") {
        None => OnError::Skip,
        Some((_, v)) => match v.as_str() {
            Some("skip") => OnError::Skip,
            Some("fail") => OnError::Fail,
            _ => {
                c.push(v.pos, sid, Some("on_error"), "expected `skip` or `fail`");
                OnError::Skip
            }
        },
    };

    let options = Node {
        pos: node.pos,
        value: yaml::Value::Map(
            entries
                .iter()
                .filter(|(k, _)| !COMMON_STAGE_KEYS.contains(&k.as_str().unwrap_or_default()))
                .cloned()
                .collect(),
        ),
    };
    Some(StageSpec {
        id: id?,
        pos: node.pos,
        kind,
        kind_pos,
        inputs,
        workers,
        workers_auto,
        channel_capacity,
        on_error,
        options,
    })
}

/// Parses `name=value` as given to `--set`.
pub fn parse_override(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}`: expected name=value")),
    }
}
