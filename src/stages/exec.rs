//! `exec`: image -> image through an external command. Each worker copy
//! (`workers: N`) owns one child process and talks to it over its stdin and
//! stdout, one item at a time: write the item, read the answer. That
//! synchronous exchange is what carries backpressure across the process
//! boundary: a slow worker holds the stage, and the stage holds the ones
//! before it, exactly as a slow in-process stage would.
//!
//! # Framing, version 1
//!
//! Both directions carry the same kind of frame:
//!
//! ```text
//! magic    16 bytes  b"convflow-exec/1\n"   (the `1` is the protocol version)
//! length    4 bytes  u32, little-endian: the JSON header's size in bytes (<= 1 MiB)
//! header   length    UTF-8 JSON object
//! payload  nbytes    raw tensor bytes, C order, little-endian; `nbytes` from the header (absent = 0)
//! ```
//!
//! 1. The worker starts by sending a *ready* frame: `{"ready": true, "protocol": 1}`, no payload.
//! 2. convflow sends one *request* per item:
//!    `{"seq": 17, "path": "data/train/cats/cat.3.jpg", "hash": "<64 hex: blake3 of the file>",
//!      "label": 0, "class": "cats", "split": "train", "epoch": 0,
//!      "kind": "image", "shape": [150, 150, 3], "dtype": "uint8", "nbytes": 67500}`
//!    then the pixels (HxWx3 RGB, row-major; HxWx1 after `decode: {color_mode: grayscale}`).
//!    `label`, `class` and `split` are `null` when unknown.
//! 3. The worker answers each request, in order, with one *answer*:
//!    `{"seq": 17, "ok": true, "shape": [H, W, 3], "dtype": "uint8", "nbytes": H*W*3}` + the pixels, or
//!    `{"seq": 17, "ok": false, "error": "ValueError: ..."}` (no payload).
//!    `seq` echoes the request's, `nbytes` must equal the shape's size times the dtype's (`uint8` 1,
//!    `float32` 4). An image stage takes only `uint8` `[H, W, C]` back (any H, W >= 1), C the
//!    request's channel count.
//! 4. convflow closes the worker's stdin at the end of the run; the worker exits on end of input.
//!
//! What happens when it goes wrong, per item (an item error: skipped and
//! listed with the stage id and the path, or fatal under `on_error: fail`):
//! `ok: false` (the worker stays), a wrong shape or dtype (the worker
//! stays), no answer within `timeout_ms`, the worker exiting, or a frame that
//! does not parse (the worker is killed and a fresh one is started for the
//! next item). Each worker copy may be restarted `restarts` times; the next
//! loss is fatal. A worker that does not send its ready frame within
//! `timeout_ms` of starting is fatal at once (a broken command, not a bad
//! item).
//!
//! The child's stderr is forwarded line by line to convflow's log (`info`,
//! with the stage id and worker index); its last line is quoted in the reason
//! when a worker dies. Children run in their own process group (Ctrl-C goes
//! to convflow, which drains and then closes their input), see
//! `CONVFLOW_STAGE_ID` and `CONVFLOW_EXEC_WORKER` in their environment, and are
//! killed when the stage is dropped. `python/convflow_exec.py` implements the
//! worker side for numpy functions.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::item::{Item, ItemKind, Meta, Payload};
use crate::stage::{BuildContext, Built, Emit, FieldError, OptionDoc, RunSignals, Stage, StageConfig, StageError};

/// The first 16 bytes of every frame, both directions.
pub const MAGIC: &[u8; 16] = b"convflow-exec/1\n";
/// The protocol version in [`MAGIC`] and in the ready frame.
pub const PROTOCOL: u32 = 1;
/// Largest JSON header accepted.
pub const MAX_HEADER: u32 = 1 << 20;
/// Largest payload accepted from a worker: an answer is a uint8 image, of
/// at most decode's default `max_pixels` in RGB (a garbage length stops here,
/// before anything is allocated or read).
pub const MAX_PAYLOAD: u64 = 3 * 178_956_970;
/// Lines of the child's stderr kept for error messages.
const STDERR_TAIL: usize = 20;

/// The process groups of the running workers (each leads its own). When
/// convflow exits without unwinding (past the drain deadline, on a second
/// signal) nothing drops the workers: [`kill_all_workers`] takes them, and
/// whatever they started, along instead of leaving them running.
static GROUPS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Kills every running worker's process group (convflow is exiting).
pub fn kill_all_workers() {
    if let Ok(groups) = GROUPS.lock() {
        for &group in groups.iter() {
            // SAFETY: killpg only sends a signal; `group` is a child not yet reaped, so not reused.
            unsafe { libc::killpg(group, libc::SIGKILL) };
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// argv of the worker: the program, then its arguments.
    pub command: Vec<String>,
    /// Extra environment variables for the worker.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How long one item (or the worker's start) may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How many times each worker process may be restarted after dying.
    #[serde(default = "default_restarts")]
    pub restarts: u32,
    /// Part of the feature cache key: change it when the worker's behaviour
    /// changes in a way its argv files do not show (an imported module, a model file).
    #[serde(default)]
    pub cache_key: String,
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_restarts() -> u32 {
    3
}

/// The canonical form (cache key, provenance): what decides the pixels.
/// Every argv entry that is a file adds its blake3, so editing the worker
/// script invalidates cached features. `timeout_ms` and `restarts` do not
/// change pixels and stay out.
impl Serialize for ExecConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Canonical<'a> {
            command: &'a [String],
            env: &'a BTreeMap<String, String>,
            cache_key: &'a str,
            files: BTreeMap<&'a str, String>,
        }
        let files = self
            .command
            .iter()
            .filter_map(|a| {
                let p = Path::new(a);
                let meta = std::fs::metadata(p).ok()?;
                if !meta.is_file() || meta.len() > 256 << 20 {
                    return None;
                }
                let bytes = std::fs::read(p).ok()?;
                Some((a.as_str(), blake3::hash(&bytes).to_hex().to_string()))
            })
            .collect();
        Canonical { command: &self.command, env: &self.env, cache_key: &self.cache_key, files }.serialize(s)
    }
}

impl StageConfig for ExecConfig {
    const KIND: &'static str = "exec";
    const SUMMARY: &'static str =
        "runs an external command (e.g. a Python pixel transform) as worker processes over stdin/stdout";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Image];
    const EMITS: Option<ItemKind> = Some(ItemKind::Image);
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc {
            name: "command",
            ty: "[string]",
            default: "(required)",
            help: "worker argv, e.g. [python, my_transform.py]",
        },
        OptionDoc { name: "env", ty: "{string: string}", default: "{}", help: "extra environment for the worker" },
        OptionDoc { name: "timeout_ms", ty: "int", default: "30000", help: "per item (and for the worker to start)" },
        OptionDoc {
            name: "restarts",
            ty: "int",
            default: "3",
            help: "restarts allowed per worker process, then fatal",
        },
        OptionDoc { name: "cache_key", ty: "string", default: "\"\"", help: "bump to invalidate cached features" },
    ];
    // One child per copy, one item at a time: copies are independent.
    const PARALLEL: bool = true;
    const AFFECTS_PIXELS: bool = true;
    const PASSES_PRECOMPUTED: bool = true;

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        match self.command.first() {
            None => errors.push(FieldError::new("command", "must name a program")),
            Some(p) if p.is_empty() => errors.push(FieldError::new("command[0]", "must name a program")),
            Some(p) if p.contains('/') => {
                if !Path::new(p).is_file() {
                    errors.push(FieldError::new("command[0]", format!("{p} does not exist")));
                }
            }
            Some(p) => {
                let on_path = std::env::var_os("PATH")
                    .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
                    .unwrap_or(false);
                if !on_path {
                    errors.push(FieldError::new("command[0]", format!("`{p}` is not on PATH")));
                }
            }
        }
        if self.timeout_ms == 0 {
            errors.push(FieldError::new("timeout_ms", "must be at least 1"));
        }
        errors
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        let config = Arc::new(self.clone());
        let first = Worker::spawn(&config, ctx.stage_id, ctx.worker).map_err(StageError::fatal)?;
        Ok(Built::Stage(Box::new(Exec {
            config,
            stage_id: ctx.stage_id.to_string(),
            index: ctx.worker,
            proc: Some(first),
            counts: Counts::default(),
        })))
    }
}

#[derive(Default, Serialize)]
struct Counts {
    /// Items answered with pixels.
    items: u64,
    /// `ok: false` answers.
    worker_errors: u64,
    /// Answers with the wrong shape or dtype.
    bad_outputs: u64,
    /// Workers that exited while an item was with them.
    worker_exits: u64,
    /// Frames that did not parse (the worker was killed).
    garbage_answers: u64,
    timeouts: u64,
    /// Fresh processes started after a loss.
    restarts: u64,
}

struct Exec {
    config: Arc<ExecConfig>,
    stage_id: String,
    index: usize,
    /// `None` after a loss, until the next item starts a fresh one.
    proc: Option<Worker>,
    counts: Counts,
}

/// One frame as read from a worker.
struct Frame {
    header: serde_json::Map<String, serde_json::Value>,
    payload: Vec<u8>,
}

/// Why a worker stopped being usable.
enum Lost {
    /// End of output at a frame boundary or inside one.
    Exited(String),
    Garbage(String),
    Timeout,
}

struct Worker {
    child: Child,
    /// (frame head, payload) to the writer thread; dropping it closes stdin.
    requests: Option<Sender<(Vec<u8>, Vec<u8>)>>,
    answers: Receiver<Result<Frame, Lost>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Disconnects when the stderr thread has read everything.
    stderr_done: Receiver<()>,
    ready: bool,
}

fn command_line(argv: &[String]) -> String {
    argv.join(" ")
}

impl Worker {
    fn spawn(config: &ExecConfig, stage_id: &str, index: usize) -> Result<Worker, String> {
        let mut cmd = Command::new(&config.command[0]);
        cmd.args(&config.command[1..])
            .envs(&config.env)
            .env("CONVFLOW_STAGE_ID", stage_id)
            .env("CONVFLOW_EXEC_WORKER", index.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        {
            // Its own process group: a terminal's Ctrl-C reaches convflow only,
            // which drains the items in flight and then closes the workers' input.
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start `{}`: {e}", command_line(&config.command)))?;
        if let Ok(mut groups) = GROUPS.lock() {
            groups.push(child.id() as i32);
        }
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let name = format!("{stage_id}-exec{index}");

        let (req_tx, req_rx) = bounded::<(Vec<u8>, Vec<u8>)>(1);
        std::thread::Builder::new()
            .name(format!("{name}-in"))
            .spawn(move || {
                let mut stdin = stdin;
                for (head, payload) in req_rx {
                    if stdin
                        .write_all(&head)
                        .and_then(|()| stdin.write_all(&payload))
                        .and_then(|()| stdin.flush())
                        .is_err()
                    {
                        break; // the worker is gone; the reader reports it
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;

        let (ans_tx, ans_rx) = bounded::<Result<Frame, Lost>>(1);
        std::thread::Builder::new()
            .name(format!("{name}-out"))
            .spawn(move || {
                let mut r = BufReader::with_capacity(1 << 16, stdout);
                loop {
                    let frame = read_frame(&mut r);
                    let last = frame.is_err();
                    if ans_tx.send(frame).is_err() || last {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;

        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (done_tx, done_rx) = bounded::<()>(0);
        let (tail2, stage, idx) = (tail.clone(), stage_id.to_string(), index);
        std::thread::Builder::new()
            .name(format!("{name}-err"))
            .spawn(move || {
                let _done = done_tx;
                let mut r = BufReader::new(stderr);
                let mut line = Vec::new();
                while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    line.clear();
                    tracing::info!(target: "convflow::exec", stage = %stage, worker = idx, "{text}");
                    if let Ok(mut t) = tail2.lock() {
                        if t.len() == STDERR_TAIL {
                            t.pop_front();
                        }
                        t.push_back(text);
                    }
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;

        Ok(Worker {
            child,
            requests: Some(req_tx),
            answers: ans_rx,
            stderr_tail: tail,
            stderr_done: done_rx,
            ready: false,
        })
    }

    /// Waits for the ready frame and checks the protocol version.
    fn await_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let frame = match self.answers.recv_timeout(timeout) {
            Ok(Ok(f)) => f,
            Ok(Err(lost)) => return Err(self.describe(lost)),
            Err(RecvTimeoutError::Timeout) => return Err(self.describe(Lost::Timeout)),
            Err(RecvTimeoutError::Disconnected) => return Err(self.describe(Lost::Exited("no output".into()))),
        };
        if frame.header.get("ready") != Some(&serde_json::Value::Bool(true)) {
            return Err(self.describe(Lost::Garbage(format!(
                "expected the ready frame first, got {}",
                serde_json::Value::Object(frame.header)
            ))));
        }
        match frame.header.get("protocol").and_then(|v| v.as_u64()) {
            Some(v) if v == PROTOCOL as u64 => {
                self.ready = true;
                Ok(())
            }
            other => Err(format!("worker speaks protocol {other:?}, convflow speaks {PROTOCOL}")),
        }
    }

    /// Kills (or reaps) the child and says what became of it, quoting its
    /// last stderr line.
    fn describe(&mut self, lost: Lost) -> String {
        let mut reason = match &lost {
            Lost::Exited(what) => format!("worker exited ({what})"),
            Lost::Garbage(what) => format!("worker answered garbage: {what}; worker killed"),
            Lost::Timeout => "no answer in time; worker killed".to_string(),
        };
        let status = match lost {
            // Its output ended: give it a moment to exit on its own.
            Lost::Exited(_) => {
                let t = Instant::now();
                loop {
                    match self.child.try_wait() {
                        Ok(Some(s)) => break Some(s),
                        Ok(None) if t.elapsed() < Duration::from_secs(1) => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        _ => break None,
                    }
                }
            }
            _ => None,
        };
        let status = status.or_else(|| {
            let _ = self.child.kill();
            self.child.wait().ok()
        });
        if let Some(s) = status
            && reason.starts_with("worker exited")
        {
            reason = format!("{reason}, {s}");
        }
        // Let the stderr thread read what the child wrote before it died.
        let _ = self.stderr_done.recv_timeout(Duration::from_millis(500));
        if let Some(last) =
            self.stderr_tail.lock().ok().and_then(|t| t.iter().rev().find(|l| !l.trim().is_empty()).cloned())
        {
            reason = format!("{reason}; stderr: {}", last.trim());
        }
        reason
    }

    /// Closes its input, gives it a moment to exit, then kills it.
    fn shut_down(&mut self, grace: Duration) {
        self.requests = None;
        let t = Instant::now();
        while t.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.requests = None;
        let group = self.child.id() as i32;
        if let Ok(None) = self.child.try_wait() {
            // The whole group: what the worker started goes with it.
            // SAFETY: killpg only sends a signal; the child is not reaped yet.
            unsafe { libc::killpg(group, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        if let Ok(mut groups) = GROUPS.lock() {
            groups.retain(|&g| g != group);
        }
    }
}

/// Reads as many bytes as there are up to `buf.len()`; fewer only at end of input.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// One frame; the framing only (magic, sizes, JSON object). What the header
/// says is checked by the stage.
fn read_frame<R: Read>(r: &mut BufReader<R>) -> Result<Frame, Lost> {
    let io = |e: std::io::Error| Lost::Exited(format!("reading its output: {e}"));
    let mut magic = [0u8; 16];
    let n = read_full(r, &mut magic).map_err(io)?;
    if n == 0 {
        return Err(Lost::Exited("end of output".into()));
    }
    if magic[..n] != MAGIC[..n] {
        // Quote what else is already buffered (never wait for more).
        let more = r.buffer();
        let more = &more[..more.len().min(48)];
        return Err(Lost::Garbage(format!(
            "expected a `convflow-exec/1` frame, got \"{}{}\"",
            magic[..n].escape_ascii(),
            more.escape_ascii()
        )));
    }
    if n < MAGIC.len() {
        return Err(Lost::Exited("output ended inside a frame".into()));
    }
    let mut len = [0u8; 4];
    if read_full(r, &mut len).map_err(io)? < 4 {
        return Err(Lost::Exited("output ended inside a frame".into()));
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(Lost::Garbage(format!("header length {len} is over {MAX_HEADER}")));
    }
    let mut head = vec![0u8; len as usize];
    if read_full(r, &mut head).map_err(io)? < head.len() {
        return Err(Lost::Exited("output ended inside a frame header".into()));
    }
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&head)
        .map_err(|e| Lost::Garbage(format!("header is not a JSON object ({e}): \"{}\"", head.escape_ascii())))?;
    let nbytes = match header.get("nbytes") {
        None | Some(serde_json::Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| Lost::Garbage(format!("`nbytes` is {v}, not a size")))?,
    };
    if nbytes > MAX_PAYLOAD {
        return Err(Lost::Garbage(format!("`nbytes` {nbytes} is over {MAX_PAYLOAD}")));
    }
    // The header's own description of the payload must agree with its size,
    // checked before the payload is read (memory follows the header, which
    // is checked, never a length alone).
    if let Some(declared) = declared_bytes(&header)
        && declared != nbytes
    {
        return Err(Lost::Garbage(format!(
            "`nbytes` {nbytes}, but {} {} is {declared} bytes",
            header.get("dtype").map(|v| v.to_string()).unwrap_or_default(),
            header.get("shape").map(|v| v.to_string()).unwrap_or_default()
        )));
    }
    let mut payload = vec![0u8; nbytes as usize];
    let got = read_full(r, &mut payload).map_err(io)?;
    if got < payload.len() {
        return Err(Lost::Exited(format!("output ended inside a payload ({got} of {nbytes} bytes)")));
    }
    Ok(Frame { header, payload })
}

/// The payload size a header's `dtype` and `shape` describe, when it has both
/// (and the dtype is one of the protocol's).
fn declared_bytes(header: &serde_json::Map<String, serde_json::Value>) -> Option<u64> {
    let size = match header.get("dtype")?.as_str()? {
        "uint8" => 1,
        "float32" => 4,
        _ => return None,
    };
    let dims = header.get("shape")?.as_array()?;
    dims.iter().try_fold(size, |n: u64, d| n.checked_mul(d.as_u64()?)).or(Some(u64::MAX))
}

/// Magic, length and JSON header of a request (the payload goes separately).
fn request_head(meta: &Meta, shape: [usize; 3]) -> Vec<u8> {
    let hash: String = meta.content_hash.iter().map(|b| format!("{b:02x}")).collect();
    let header = serde_json::json!({
        "seq": meta.seq,
        "path": meta.path.to_string_lossy(),
        "hash": hash,
        "label": meta.label.as_ref().map(|l| l.index),
        "class": meta.label.as_ref().and_then(|l| l.classes.get(l.index as usize).cloned()),
        "split": meta.split.as_deref(),
        "epoch": meta.epoch,
        "variant": meta.variant,
        "kind": "image",
        "shape": shape,
        "dtype": "uint8",
        "nbytes": shape.iter().product::<usize>(),
    });
    let json = serde_json::to_vec(&header).expect("a JSON value serializes");
    let mut head = Vec::with_capacity(MAGIC.len() + 4 + json.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&(json.len() as u32).to_le_bytes());
    head.extend_from_slice(&json);
    head
}

/// An `ok: true` answer's pixels, if they are a uint8 HxWxC image of the
/// request's channel count `channels` (3: RGB, 1: gray).
fn answer_image(frame: Frame, channels: u64) -> Result<Payload, String> {
    let h = &frame.header;
    let dtype = h.get("dtype").and_then(|v| v.as_str()).unwrap_or("(none)");
    let shape: Option<Vec<u64>> =
        h.get("shape").and_then(|v| v.as_array()).and_then(|a| a.iter().map(|d| d.as_u64()).collect());
    let described =
        || format!("{} {}", dtype, h.get("shape").map(|s| s.to_string()).unwrap_or_else(|| "(no shape)".into()));
    let (height, width) = match (dtype, shape.as_deref()) {
        ("uint8", Some(&[height, width, c])) if height > 0 && width > 0 && c == channels => (height, width),
        _ => return Err(format!("worker answered {}; an image stage needs uint8 [H, W, {channels}]", described())),
    };
    let need = height * width * channels;
    if frame.payload.len() as u64 != need {
        return Err(format!(
            "worker answered {} with {} bytes; that shape needs {need}",
            described(),
            frame.payload.len()
        ));
    }
    let (Ok(w), Ok(hh)) = (u32::try_from(width), u32::try_from(height)) else {
        return Err(format!("worker answered {}: too large", described()));
    };
    let bad = || format!("worker answered {}: bad buffer", described());
    if channels == 1 {
        GrayImage::from_raw(w, hh, frame.payload).map(Payload::Gray).ok_or_else(bad)
    } else {
        RgbImage::from_raw(w, hh, frame.payload).map(Payload::Image).ok_or_else(bad)
    }
}

impl Exec {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    fn cmd(&self) -> String {
        command_line(&self.config.command)
    }

    /// The live worker, started (and waited for) if need be.
    fn worker(&mut self) -> Result<&mut Worker, StageError> {
        if self.proc.is_none() {
            let w = Worker::spawn(&self.config, &self.stage_id, self.index)
                .map_err(|e| StageError::fatal(format!("cannot restart the worker: {e}")))?;
            self.counts.restarts += 1;
            self.proc = Some(w);
        }
        let timeout = self.timeout();
        let cmd = self.cmd();
        let w = self.proc.as_mut().expect("started above");
        if !w.ready
            && let Err(e) = w.await_ready(timeout)
        {
            self.proc = None;
            return Err(StageError::fatal(format!("worker `{cmd}` did not start: {e}")));
        }
        Ok(self.proc.as_mut().expect("started above"))
    }

    /// The worker is gone (killed if it was not): an item error, or fatal
    /// once this copy has used up its restarts.
    fn lost(&mut self, path: &Path, lost: Lost) -> StageError {
        match lost {
            Lost::Exited(_) => self.counts.worker_exits += 1,
            Lost::Garbage(_) => self.counts.garbage_answers += 1,
            Lost::Timeout => self.counts.timeouts += 1,
        }
        let timeout_ms = self.config.timeout_ms;
        let mut reason = match self.proc.take() {
            Some(mut w) => w.describe(lost),
            None => "worker gone".to_string(),
        };
        if reason.starts_with("no answer in time") {
            reason = reason.replacen("in time", &format!("within {timeout_ms} ms"), 1);
        }
        if self.counts.restarts >= self.config.restarts as u64 {
            return StageError::fatal(format!(
                "{}: {reason}; worker `{}` already restarted {} time(s) (restarts: {}), giving up",
                path.display(),
                self.cmd(),
                self.counts.restarts,
                self.config.restarts
            ));
        }
        tracing::warn!(stage = %self.stage_id, worker = self.index, path = %path.display(), "{reason}; restarting it for the next item");
        StageError::item(path, reason)
    }
}

impl Stage for Exec {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        let Item { meta, payload } = item;
        let (shape, pixels) = match payload {
            Payload::Image(img) => ([img.height() as usize, img.width() as usize, 3], img.into_raw()),
            Payload::Gray(img) => ([img.height() as usize, img.width() as usize, 1], img.into_raw()),
            _ => return Err(StageError::fatal("expected an image")),
        };
        let head = request_head(&meta, shape);
        let timeout = self.timeout();
        let w = self.worker()?;
        if let Some(tx) = &w.requests {
            // Fails only when the writer stopped (worker gone); the reader says why.
            let _ = tx.send((head, pixels));
        }
        let answer = match w.answers.recv_timeout(timeout) {
            Ok(Ok(frame)) => frame,
            Ok(Err(lost)) => return Err(self.lost(&meta.path, lost)),
            Err(RecvTimeoutError::Timeout) => return Err(self.lost(&meta.path, Lost::Timeout)),
            Err(RecvTimeoutError::Disconnected) => return Err(self.lost(&meta.path, Lost::Exited("no output".into()))),
        };
        if answer.header.get("seq").and_then(|v| v.as_u64()) != Some(meta.seq) {
            let got = answer.header.get("seq").map(|v| v.to_string()).unwrap_or_else(|| "none".into());
            return Err(self.lost(&meta.path, Lost::Garbage(format!("answer for seq {got}, expected {}", meta.seq))));
        }
        match answer.header.get("ok").and_then(|v| v.as_bool()) {
            Some(true) => {}
            Some(false) => {
                self.counts.worker_errors += 1;
                let msg = answer.header.get("error").and_then(|v| v.as_str()).unwrap_or("(no message)");
                return Err(StageError::item(&meta.path, format!("worker error: {msg}")));
            }
            None => {
                let header = serde_json::Value::Object(answer.header).to_string();
                return Err(self.lost(&meta.path, Lost::Garbage(format!("answer header has no `ok`: {header}"))));
            }
        }
        let payload = answer_image(answer, shape[2] as u64).map_err(|e| {
            self.counts.bad_outputs += 1;
            StageError::item(&meta.path, e)
        })?;
        self.counts.items += 1;
        out.emit(Item { meta, payload })?;
        Ok(())
    }

    fn finish(&mut self, _out: &mut dyn Emit, _signals: &RunSignals) -> Result<(), StageError> {
        if let Some(mut w) = self.proc.take() {
            w.shut_down(Duration::from_secs(2));
        }
        Ok(())
    }

    fn summary(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.counts).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&(header.len() as u32).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frames_parse_and_garbage_is_named() {
        let bytes =
            frame(r#"{"seq": 3, "ok": true, "shape": [1, 2, 3], "dtype": "uint8", "nbytes": 6}"#, &[1, 2, 3, 4, 5, 6]);
        let f = read_frame(&mut BufReader::new(&bytes[..])).ok().unwrap();
        assert_eq!(f.payload, [1, 2, 3, 4, 5, 6]);
        let Ok(Payload::Image(img)) = answer_image(f, 3) else { panic!("an RGB image") };
        assert_eq!(img.dimensions(), (2, 1));
        let gray = frame(r#"{"seq": 3, "ok": true, "shape": [1, 2, 1], "dtype": "uint8", "nbytes": 2}"#, &[7, 8]);
        let f = read_frame(&mut BufReader::new(&gray[..])).ok().unwrap();
        let Ok(Payload::Gray(img)) = answer_image(f, 1) else { panic!("a gray image") };
        assert_eq!(img.as_raw(), &[7, 8]);
        let f = read_frame(&mut BufReader::new(&bytes[..])).ok().unwrap();
        let err = answer_image(f, 1).unwrap_err();
        assert!(err.contains("needs uint8 [H, W, 1]"), "an RGB answer to a gray request: {err}");

        let Err(Lost::Garbage(why)) = read_frame(&mut BufReader::new(&b"hello, world\n"[..])) else { panic!() };
        assert!(why.contains("hello, world"), "{why}");
        let Err(Lost::Exited(why)) = read_frame(&mut BufReader::new(&bytes[..30])) else { panic!() };
        assert!(why.contains("inside"), "{why}");
        let Err(Lost::Exited(why)) = read_frame(&mut BufReader::new(&b""[..])) else { panic!() };
        assert_eq!(why, "end of output");

        // A header whose shape does not match its size is refused before the
        // payload is read: this reader fails if it is asked for one byte of it.
        struct HeaderOnly(Vec<u8>, usize);
        impl Read for HeaderOnly {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let rest = &self.0[self.1..];
                if rest.is_empty() {
                    return Err(std::io::Error::other("the payload was read"));
                }
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                self.1 += n;
                Ok(n)
            }
        }
        for (header, why) in [
            (r#"{"ok": true, "shape": [2, 2, 3], "dtype": "uint8", "nbytes": 400000000}"#, "is 12 bytes"),
            (r#"{"ok": true, "shape": [60000, 60000, 3], "dtype": "uint8", "nbytes": 10800000000}"#, "is over"),
        ] {
            let mut r = BufReader::with_capacity(8, HeaderOnly(frame(header, &[]), 0));
            let Err(Lost::Garbage(got)) = read_frame(&mut r) else { panic!("{header}: not refused from its header") };
            assert!(got.contains(why), "{got}");
        }

        let wrong = frame(r#"{"seq": 3, "ok": true, "shape": [1, 2], "dtype": "uint8", "nbytes": 2}"#, &[0, 0]);
        let err = answer_image(read_frame(&mut BufReader::new(&wrong[..])).ok().unwrap(), 3).unwrap_err();
        assert!(err.contains("uint8 [1,2]") && err.contains("needs uint8 [H, W, 3]"), "{err}");
    }
}
