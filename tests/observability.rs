//! Observability end to end: the `/metrics` endpoint during a CLI run, the
//! snapshot beside report.json, skipped.csv, the bottleneck sentence, and a
//! real Prometheus (Debian's package, installed by tests/setup.sh)
//! scraping a running pipeline on loopback.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use convflow::config;
use convflow::graph::Graph;
use convflow::item::{Item, ItemKind};
use convflow::runtime::{self, RunOptions};
use convflow::stage::Registry;
use convflow::stage::*;
use convflow::stages::builtin_registry;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------- helpers

/// A port nobody listens on right now (loopback only).
fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A plain HTTP/1.0 GET (the body runs to EOF): status and body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `metric{...,stage="x",...} value` lines -> (metric, stage) -> value,
/// summed over any other labels (e.g. `reason`).
fn parse_exposition(text: &str, pipeline: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Some((name, labels)) = series.split_once('{') else { continue };
        if !labels.contains(&format!("pipeline=\"{pipeline}\"")) {
            continue;
        }
        let stage = labels.split("stage=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
        *out.entry((name.to_string(), stage.to_string())).or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
    }
    out
}

fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): run tests/setup.sh, it installs Debian's prometheus package")
        });
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The demo data set, each image copied `copies` times (distinct names,
/// same bytes), plus one file that is not an image.
fn dataset(dir: &Path, copies: usize) -> usize {
    let demo = dir.join("demo");
    let n = convflow::demo::generate(&demo, 42).unwrap();
    let data = dir.join("data");
    let mut count = 0;
    for split in ["train", "validation", "test"] {
        for class in ["cats", "dogs"] {
            let to = data.join(split).join(class);
            std::fs::create_dir_all(&to).unwrap();
            for e in std::fs::read_dir(demo.join(split).join(class)).unwrap() {
                let p = e.unwrap().path();
                for k in 0..copies {
                    std::fs::copy(&p, to.join(format!("c{k}_{}", p.file_name().unwrap().to_string_lossy()))).unwrap();
                    count += 1;
                }
            }
        }
    }
    assert_eq!(count, n * copies);
    std::fs::write(data.join("train/cats/zz_broken.jpg"), b"this is not a JPEG").unwrap();
    count + 1
}

/// Passes features on after `sleep_ms`: a deliberately slow stage.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Throttle {
    sleep_ms: u64,
}

struct ThrottleStage(Duration);

impl Stage for ThrottleStage {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        std::thread::sleep(self.0);
        out.emit(item)?;
        Ok(())
    }
}

impl StageConfig for Throttle {
    const KIND: &'static str = "throttle";
    const SUMMARY: &'static str = "test stage: sleeps per item";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Features];
    const EMITS: Option<ItemKind> = Some(ItemKind::Features);
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(ThrottleStage(Duration::from_millis(self.sleep_ms)))))
    }
}

fn registry() -> Registry {
    let mut r = builtin_registry();
    r.register::<Throttle>();
    r
}

/// demo data -> tiny model -> throttle -> writer, named `name`.
fn throttled_graph(name: &str, dir: &Path, sleep_ms: u64) -> Graph {
    let demo = dir.join("demo");
    convflow::demo::generate(&demo, 42).unwrap();
    let yaml = format!(
        "name: {name}
stages:
  - {{id: files, kind: file_reader, dir: '{demo}', splits: [train, validation, test]}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [64, 64]}}
  - {{id: batch, kind: batch, input: resize, size: 10}}
  - {{id: model, kind: onnx_features, input: batch, model: '{model}', intra_threads: 1, cache: '{cache}'}}
  - {{id: throttle, kind: throttle, input: model, sleep_ms: {sleep_ms}}}
  - {{id: write, kind: feature_writer, input: throttle, dir: '{out}'}}
",
        demo = demo.display(),
        model = common::tiny_model().display(),
        cache = dir.join("cache").display(),
        out = dir.join("out").display(),
    );
    let cfg = config::parse_str(&yaml, Path::new("observability.yaml"), &[]).unwrap();
    Graph::build(cfg, &registry()).unwrap_or_else(|e| panic!("{e}"))
}

// ------------------------------------------------------------------ tests

#[test]
fn the_metrics_key_is_parsed_and_checked_with_positions() {
    let ok =
        config::parse_str("metrics: {listen: '127.0.0.1:9184', linger: 2}\nstages: []\n", Path::new("p.yaml"), &[])
            .unwrap();
    assert_eq!(ok.metrics.listen, Some("127.0.0.1:9184".parse().unwrap()));
    assert_eq!(ok.metrics.linger, Duration::from_secs(2));
    let bad =
        config::parse_str("metrics:\n  listen: nowhere\n  port: 3\nstages: []\n", Path::new("p.yaml"), &[]).unwrap();
    let messages: Vec<String> = bad.errors.iter().map(|e| e.to_string()).collect();
    assert!(messages.iter().any(|m| m.starts_with("p.yaml:2:11: field `metrics.listen`")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("unknown key `port`")), "{messages:?}");
    let none = config::parse_str("metrics: {listen: ''}\nstages: []\n", Path::new("p.yaml"), &[]).unwrap();
    assert_eq!(none.metrics.listen, None);
}

#[test]
fn cli_serves_per_stage_metrics_during_a_run_and_the_snapshot_matches_the_report_and_the_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let total = dataset(tmp.path(), 10);
    let out = tmp.path().join("out");
    let addr = free_addr();
    let log = std::fs::File::create(tmp.path().join("stderr.txt")).unwrap();
    let mut child: Child = common::bin()
        .args(["run", "pipelines/extract_features.yaml", "--set"])
        .arg(format!("data_dir={}", tmp.path().join("data").display()))
        .arg("--set")
        .arg(format!("out_dir={}", out.display()))
        .args(["--set", "cache_dir=", "--set"])
        .arg(format!("base={}", common::tiny_model().display()))
        .args(["--metrics-listen", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    // Scrape while the process runs; keep the last full scrape.
    let stages = ["files", "decode", "resize", "batch", "conv_base", "write"];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut during: Option<String> = None;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the run took over 120 s");
        }
        if let Ok((200, body)) = http_get(addr, "/metrics")
            && stages.iter().all(|s| {
                body.contains(&format!("convflow_stage_items_in_total{{pipeline=\"extract_features\",stage=\"{s}\"}}"))
            })
        {
            during = Some(body);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(tmp.path().join("stderr.txt")).unwrap();
    assert!(status.success(), "convflow run failed: {stderr}");
    let during = during.unwrap_or_else(|| {
        panic!("no scrape of http://{addr}/metrics showed every stage while the run went on\n{stderr}")
    });
    for name in [
        "convflow_stage_busy_seconds",
        "convflow_stage_input_wait_seconds",
        "convflow_stage_output_blocked_seconds",
        "convflow_channel_fill_items",
        "convflow_channel_capacity_items",
    ] {
        assert!(
            during.contains(&format!("{name}{{pipeline=\"extract_features\",stage=\"conv_base\"}}")),
            "{name} missing:\n{during}"
        );
    }
    // On the CPU a plain VGG runs in convflow's own engine (`engine: auto`).
    assert!(
        during.contains(
            "convflow_execution_provider_info{pipeline=\"extract_features\",stage=\"conv_base\",provider=\"winograd ("
        ),
        "{during}"
    );
    promtool_check(&during);

    // The snapshot, the report and the rows written agree.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let snapshot = std::fs::read_to_string(out.join("metrics.prom")).unwrap();
    promtool_check(&snapshot);
    let m = parse_exposition(&snapshot, "extract_features");
    let get = |name: &str, stage: &str| m.get(&(name.to_string(), stage.to_string())).copied().unwrap_or(0.0);
    for s in report["stages"].as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        assert_eq!(get("convflow_stage_items_in_total", id), s["items_in"].as_f64().unwrap(), "{id} items in");
        assert_eq!(get("convflow_stage_items_out_total", id), s["items_out"].as_f64().unwrap(), "{id} items out");
        assert_eq!(get("convflow_stage_item_errors_total", id), s["item_errors"].as_f64().unwrap(), "{id} errors");
        let busy = get("convflow_stage_busy_seconds", id);
        assert!(
            (busy - s["busy_seconds"].as_f64().unwrap()).abs() < 0.002,
            "{id} busy {busy} vs {}",
            s["busy_seconds"]
        );
    }
    assert_eq!(report["stages"][0]["items_out"], total as u64, "the source read every file");
    // The one broken file: skipped by decode, listed in skipped.csv, counted by reason.
    assert_eq!(report["stages"][1]["errors_by_reason"], serde_json::json!({"not_a_recognised_image_format": 1}));
    assert!(snapshot.contains("convflow_stage_item_errors_total{pipeline=\"extract_features\",stage=\"decode\",reason=\"not_a_recognised_image_format\"} 1"), "{snapshot}");
    let csv = std::fs::read_to_string(out.join("skipped.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert_eq!(lines[0], "path,stage,reason");
    assert!(lines[1].ends_with("zz_broken.jpg,decode,not a recognised image format"), "{csv}");
    let rows: usize = ["train", "validation", "test"]
        .iter()
        .map(|s| std::fs::read_to_string(out.join(s).join("paths.txt")).unwrap().lines().count())
        .sum();
    assert_eq!(rows, total - 1);
    assert_eq!(get("convflow_stage_items_in_total", "write"), rows as f64);
}

#[test]
fn a_deliberately_slow_stage_is_named_the_bottleneck() {
    let tmp = tempfile::tempdir().unwrap();
    let g = throttled_graph("bottleneck_test", tmp.path(), 8);
    let report = runtime::run(&g, &RunOptions::default()).unwrap();
    let sentence = report.bottleneck.clone().unwrap_or_default();
    assert!(sentence.starts_with("throttle is the bottleneck"), "{sentence}\n{}", report.table());
    // No skipped items: no skipped.csv.
    let path = tmp.path().join("report.json");
    std::fs::write(tmp.path().join("skipped.csv"), "stale").unwrap();
    runtime::write_report(&report, &path).unwrap();
    assert!(!tmp.path().join("skipped.csv").exists(), "a stale skipped.csv stays behind");
}

/// Stops the Prometheus server however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus_query(prom: SocketAddr, query: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let (status, body) =
        http_get(prom, &format!("/api/v1/query?query={}", urlencode(query))).unwrap_or((0, String::new()));
    if status != 200 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"]
        .as_array()
        .map(|results| {
            results
                .iter()
                .map(|r| {
                    let labels = r["metric"]
                        .as_object()
                        .map(|o| {
                            o.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect()
                        })
                        .unwrap_or_default();
                    (labels, r["value"][1].as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_scrapes_a_running_pipeline_and_ends_with_the_reports_counters() {
    let which = Command::new("sh").args(["-c", "command -v prometheus && command -v promtool"]).output().unwrap();
    assert!(
        which.status.success(),
        "Prometheus is not installed (no `prometheus` or `promtool` on PATH): run tests/setup.sh, which apt-get installs Debian's prometheus package"
    );
    let tmp = tempfile::tempdir().unwrap();
    let metrics_addr = free_addr();
    let exporter = convflow::telemetry::install_prometheus(Some(metrics_addr)).unwrap();
    wait_for("the metrics endpoint", Duration::from_secs(10), || {
        http_get(metrics_addr, "/health").is_ok_and(|(s, _)| s == 200)
    });

    // Prometheus on loopback, scraping only the pipeline, every second.
    let prom_addr = free_addr();
    let cfg = tmp.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: convflow
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs: [{{targets: ['{metrics_addr}']}}]
"
        ),
    )
    .unwrap();
    let prom_log = std::fs::File::create(tmp.path().join("prometheus.log")).unwrap();
    let _server = Server(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
            .arg(format!("--web.listen-address={prom_addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(prom_log)
            .spawn()
            .expect("cannot start prometheus (run tests/setup.sh)"),
    );
    let prom_log = || std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default();
    wait_for("Prometheus to be ready", Duration::from_secs(30), || {
        http_get(prom_addr, "/-/ready").is_ok_and(|(s, _)| s == 200)
    });
    wait_for("the first scrape", Duration::from_secs(20), || {
        prometheus_query(prom_addr, "up{job=\"convflow\"}").first().is_some_and(|(_, v)| *v == 1.0)
    });

    // ~160 items x 40 ms in the throttle: several scrapes while it runs.
    let g = throttled_graph("prom_test", tmp.path(), 40);
    let run = std::thread::spawn(move || runtime::run(&g, &RunOptions::default()));
    let mut positive_during_run = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run.is_finished() && Instant::now() < deadline {
        let rates = prometheus_query(
            prom_addr,
            "rate(convflow_stage_items_out_total{pipeline=\"prom_test\",stage=\"throttle\"}[3s])",
        );
        if rates.iter().any(|(_, v)| *v > 0.0) && !run.is_finished() {
            positive_during_run = true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let report = run.join().unwrap().unwrap();
    assert!(positive_during_run, "Prometheus never saw a positive rate of items out during the run\n{}", prom_log());
    assert!(report.wall_seconds > 4.0, "the run was too quick to be scraped several times: {}", report.table());

    // After a scrape or two more, Prometheus holds exactly the report's counters.
    let expected: BTreeMap<(String, String), f64> = report
        .stages
        .iter()
        .flat_map(|s| {
            [
                (("convflow_stage_items_in_total".to_string(), s.id.clone()), s.items_in as f64),
                (("convflow_stage_items_out_total".to_string(), s.id.clone()), s.items_out as f64),
            ]
        })
        .chain(report.cache.iter().flat_map(|c| {
            [
                (("convflow_cache_hits_total".to_string(), "model".to_string()), c.hits as f64),
                (("convflow_cache_misses_total".to_string(), "model".to_string()), c.misses as f64),
                (("convflow_cache_writes_total".to_string(), "model".to_string()), c.writes as f64),
            ]
        }))
        .collect();
    assert_eq!(expected[&("convflow_stage_items_out_total".to_string(), "files".to_string())], 160.0);
    assert_eq!(expected[&("convflow_cache_misses_total".to_string(), "model".to_string())], 160.0);
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        seen.clear();
        for name in [
            "convflow_stage_items_in_total",
            "convflow_stage_items_out_total",
            "convflow_cache_hits_total",
            "convflow_cache_misses_total",
            "convflow_cache_writes_total",
        ] {
            for (labels, v) in prometheus_query(prom_addr, &format!("{name}{{pipeline=\"prom_test\"}}")) {
                seen.insert((name.to_string(), labels.get("stage").cloned().unwrap_or_default()), v);
            }
        }
        if seen == expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(seen, expected, "Prometheus's final counters differ from the run report");

    // The same values in the process's own snapshot, which promtool accepts.
    let snapshot = exporter.render();
    let parsed = parse_exposition(&snapshot, "prom_test");
    for (key, v) in &expected {
        assert_eq!(parsed.get(key), Some(v), "{key:?} in the snapshot");
    }
    let (_, live) = http_get(metrics_addr, "/metrics").unwrap();
    promtool_check(&live);
    assert!(
        live.contains("convflow_inference_batch_seconds_bucket{pipeline=\"prom_test\",stage=\"model\",le=\"+Inf\"} 16"),
        "{live}"
    );
}

/// What a newcomer sees from `convflow demo` (here through the tiny model):
/// the table, each stage's details in words, the verdict and the report's
/// path last, nothing raw (no JSON) after the table, the next commands; and
/// on a machine with no NVIDIA driver, `device: auto` on the CPU is an info
/// line, not a warning.
#[test]
fn the_demo_ends_with_a_readable_verdict_and_the_next_steps_and_no_gpu_is_no_warning() {
    let clone = tempfile::tempdir().unwrap();
    for dir in ["pipelines", "models"] {
        std::os::unix::fs::symlink(common::root().join(dir), clone.path().join(dir)).unwrap();
    }
    let o = common::bin()
        .current_dir(clone.path())
        .env_remove("RUST_LOG")
        .args(["demo", "--set", "image_size=64", "--set"])
        .arg(format!("base={}", common::tiny_model().display()))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let header = lines.iter().position(|l| l.starts_with("stage ")).unwrap_or_else(|| panic!("no table:\n{stdout}"));
    let next = lines.iter().position(|l| *l == "Next:").unwrap_or_else(|| panic!("no next steps:\n{stdout}"));
    for l in &lines[header..next] {
        assert!(!l.contains('{') && !l.contains('"'), "raw JSON after the table: {l}\n{stdout}");
    }
    assert!(stdout.contains("conv_base: ") && stdout.contains("images inferred 160"), "{stdout}");
    assert!(lines[next - 1] == "report: out/features/report.json", "{stdout}");
    assert!(lines[next - 2].contains("is the bottleneck"), "{stdout}");
    assert!(lines[next + 1].contains("pipelines/feature_extraction.yaml"), "{stdout}");
    if convflow::ml::cuda::nvidia_driver_present() {
        eprintln!("skipping the no-GPU half: this machine has an NVIDIA driver");
    } else {
        assert!(!stderr.contains("WARN"), "a warning on a machine with no GPU:\n{stderr}");
        assert!(stderr.contains("device: auto runs on the CPU (no NVIDIA GPU"), "{stderr}");
    }
}
