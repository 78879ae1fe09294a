//! The actor runtime with stages registered the way a user registers them:
//! exact backpressure bound, order through worker pools, fatal errors and
//! panics named by stage, interrupt drains.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use convflow::config;
use convflow::graph::Graph;
use convflow::item::{Item, ItemKind, Meta, Payload};
use convflow::runtime::{self, RunError, RunOptions};
use convflow::stage::Registry;
use convflow::stage::*;
use serde::{Deserialize, Serialize};

#[derive(Default)]
struct Probe {
    emitted: AtomicU64,
    released: AtomicBool,
    received: Mutex<Vec<u64>>,
}

static PROBES: LazyLock<Mutex<HashMap<String, Arc<Probe>>>> = LazyLock::new(Default::default);

fn probe(name: &str) -> Arc<Probe> {
    PROBES.lock().unwrap().entry(name.to_string()).or_default().clone()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Numbers {
    count: u64,
    probe: String,
}

struct NumbersSource(u64, Arc<Probe>);

impl Source for NumbersSource {
    fn run(&mut self, out: &mut dyn Emit, ctx: &SourceContext<'_>) -> Result<(), StageError> {
        for i in 0..self.0 {
            if ctx.signals.should_stop() {
                break;
            }
            let meta = Meta {
                path: Arc::from(Path::new(&format!("item-{i}"))),
                content_hash: [0; 32],
                label: None,
                split: None,
                epoch: 0,
                variant: 0,
                view: 0,
                seq: i,
            };
            out.emit(Item { meta, payload: Payload::Bytes(Arc::from(vec![0u8; 4])) })?;
            self.1.emitted.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl StageConfig for Numbers {
    const KIND: &'static str = "numbers";
    const SUMMARY: &'static str = "test source";
    const ACCEPTS: &'static [ItemKind] = &[];
    const EMITS: Option<ItemKind> = Some(ItemKind::Bytes);
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Source(Box::new(NumbersSource(self.count, probe(&self.probe)))))
    }
}

/// Passes items on after an optional delay that varies per item; fails or
/// panics at a chosen item.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Relay {
    #[serde(default)]
    jitter_ms: u64,
    #[serde(default)]
    fail_at: Option<u64>,
    #[serde(default)]
    panic_at: Option<u64>,
}

struct RelayStage(u64, Option<u64>, Option<u64>);

impl Stage for RelayStage {
    fn process(&mut self, item: Item, out: &mut dyn Emit) -> Result<(), StageError> {
        let seq = item.meta.seq;
        if self.0 > 0 {
            std::thread::sleep(Duration::from_millis((seq * 7919) % self.0));
        }
        if self.1 == Some(seq) {
            return Err(StageError::fatal("broken on purpose"));
        }
        if self.2 == Some(seq) {
            panic!("boom");
        }
        out.emit(item)?;
        Ok(())
    }
}

impl StageConfig for Relay {
    const KIND: &'static str = "relay";
    const SUMMARY: &'static str = "test transform";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Bytes];
    const EMITS: Option<ItemKind> = Some(ItemKind::Bytes);
    const OPTIONS: &'static [OptionDoc] = &[];
    const PARALLEL: bool = true;
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(RelayStage(self.jitter_ms, self.fail_at, self.panic_at))))
    }
}

/// Records what arrives; with `gate`, holds the first item until released.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    probe: String,
    #[serde(default)]
    gate: bool,
}

struct RecordStage(Arc<Probe>, bool);

impl Stage for RecordStage {
    fn process(&mut self, item: Item, _: &mut dyn Emit) -> Result<(), StageError> {
        while self.1 && !self.0.released.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.0.received.lock().unwrap().push(item.meta.seq);
        Ok(())
    }
}

impl StageConfig for Record {
    const KIND: &'static str = "record";
    const SUMMARY: &'static str = "test sink";
    const ACCEPTS: &'static [ItemKind] = &[ItemKind::Bytes];
    const EMITS: Option<ItemKind> = None;
    const OPTIONS: &'static [OptionDoc] = &[];
    fn build(&self, _: &BuildContext<'_>) -> Result<Built, StageError> {
        Ok(Built::Stage(Box::new(RecordStage(probe(&self.probe), self.gate))))
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register::<Numbers>().register::<Relay>().register::<Record>();
    r
}

fn graph(yaml: &str) -> Graph {
    let cfg = config::parse_str(yaml, Path::new("test.yaml"), &[]).unwrap();
    Graph::build(cfg, &registry()).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `f` gives the same value for 300 ms (the pipeline is stuck).
fn settled(f: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = f();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = f();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_millis(300) {
            break;
        }
    }
    last
}

#[test]
fn a_blocked_sink_holds_back_the_source_by_exactly_the_channel_capacities() {
    let g = graph(
        "stages:
  - {id: src, kind: numbers, count: 1000, probe: bp}
  - {id: relay, kind: relay, input: src, channel_capacity: 2}
  - {id: sink, kind: record, input: relay, probe: bp, gate: true, channel_capacity: 3}
",
    );
    let p = probe("bp");
    let run = std::thread::spawn(move || runtime::run(&g, &RunOptions::default()));
    // relay's input holds 2, relay holds 1 blocked on output, sink's input
    // holds 3, sink holds 1 in process: 7 items have left the source.
    assert_eq!(settled(|| p.emitted.load(Ordering::SeqCst)), 2 + 1 + 3 + 1);
    p.released.store(true, Ordering::SeqCst);
    let report = run.join().unwrap().unwrap();
    assert_eq!(*p.received.lock().unwrap(), (0..1000).collect::<Vec<_>>());
    assert_eq!(report.stages[2].items_in, 1000);
}

#[test]
fn a_worker_pool_keeps_input_order() {
    let g = graph(
        "stages:
  - {id: src, kind: numbers, count: 200, probe: order}
  - {id: relay, kind: relay, input: src, workers: 4, jitter_ms: 5}
  - {id: sink, kind: record, input: relay, probe: order}
",
    );
    runtime::run(&g, &RunOptions::default()).unwrap();
    assert_eq!(*probe("order").received.lock().unwrap(), (0..200).collect::<Vec<_>>());
}

#[test]
fn a_fatal_error_stops_everyone_and_names_the_stage() {
    for (name, option) in [("fatal", "fail_at: 5"), ("panic", "panic_at: 5")] {
        let g = graph(&format!(
            "stages:
  - {{id: src, kind: numbers, count: 100000000, probe: {name}}}
  - {{id: breaker, kind: relay, input: src, {option}}}
  - {{id: sink, kind: record, input: breaker, probe: {name}}}
"
        ));
        match runtime::run(&g, &RunOptions::default()) {
            Err(RunError::Stage { stage, message, .. }) => {
                assert_eq!(stage, "breaker");
                assert!(message.contains(if name == "fatal" { "broken on purpose" } else { "panicked" }), "{message}");
            }
            other => panic!("{name}: expected a stage error, got {:?}", other.map(|r| r.stages.len())),
        }
        assert!(probe(name).emitted.load(Ordering::SeqCst) < 1000, "{name}: the source stopped early");
        // Stopping is immediate: items still in flight may be dropped, but
        // nothing from after the failure gets through and order holds.
        let received = probe(name).received.lock().unwrap().clone();
        assert_eq!(received, (0..received.len() as u64).collect::<Vec<_>>());
        assert!(received.len() <= 5, "{name}: {received:?}");
    }
}

#[test]
fn an_interrupt_stops_the_sources_and_drains_what_is_in_flight() {
    let g = graph(
        "stages:
  - {id: src, kind: numbers, count: 100000000, probe: int}
  - {id: relay, kind: relay, input: src, jitter_ms: 2}
  - {id: sink, kind: record, input: relay, probe: int}
",
    );
    let options = RunOptions::default();
    let signals = options.signals.clone();
    let run = std::thread::spawn(move || runtime::run(&g, &options));
    std::thread::sleep(Duration::from_millis(200));
    signals.interrupted.store(true, Ordering::SeqCst);
    let report = run.join().unwrap().unwrap();
    assert!(report.interrupted);
    let p = probe("int");
    // Everything the source emitted reached the sink: nothing in flight was dropped.
    assert_eq!(p.received.lock().unwrap().len() as u64, p.emitted.load(Ordering::SeqCst));
}
