//! What a program that embeds convflow (the Python package, python/) uses
//! of the library, held here so a change to the runtime or the file reader
//! shows up in `cargo test` and not only in pytest: a tap on a stage's
//! output, the progress counters, and a `file_reader` given an explicit
//! one-pass order.

mod common;

use std::sync::{Arc, Mutex};

use convflow::config;
use convflow::graph::Graph;
use convflow::runtime::{self, Envelope, RunHooks, RunOptions};
use convflow::stages::file_reader::{ExplicitOrder, FileReaderConfig};

fn graph() -> Graph {
    let dir = common::root().join("tests/fixtures/images");
    let text = format!(
        "name: embed\nstages:\n  - {{id: files, kind: file_reader, dir: {}}}\n  - {{id: decode, kind: decode, input: files, workers: 2}}\n",
        dir.display()
    );
    let cfg = config::parse_str(&text, std::path::Path::new("embed.yaml"), &[]).unwrap();
    Graph::build(cfg, &convflow::stages::builtin_registry()).unwrap()
}

#[test]
fn a_tapped_file_reader_emits_exactly_the_positions_it_is_given_as_that_epoch() {
    let mut g = graph();
    let source: FileReaderConfig = serde_json::from_str(&g.stages[0].config.canonical_json()).unwrap();
    let listing = convflow::stage::StageConfig::listing(&source).unwrap();
    assert_eq!(listing.len(), 9);
    // A sampler's order: repeats allowed (padding), files left out never read.
    let positions = vec![4, 0, 7, 4];
    let mut ordered = source.clone();
    ordered.order = Some(ExplicitOrder { epoch: 3, positions: positions.clone() });
    g.stages[0].config = Arc::new(ordered);

    let (tx, rx) = crossbeam_channel::bounded(2);
    let watched = Arc::new(Mutex::new(Vec::new()));
    let into = watched.clone();
    let hooks =
        RunHooks { taps: vec![("decode".into(), tx)], watch: Some(Box::new(move |t| *into.lock().unwrap() = t)) };
    let reader = std::thread::spawn(move || rx.iter().collect::<Vec<Envelope>>());
    let report = runtime::run_with(&g, &RunOptions { metrics: false, ..Default::default() }, hooks).unwrap();
    let got = reader.join().unwrap();

    let items: Vec<_> = got.iter().filter_map(|e| if let Envelope::Item(i) = e { Some(i) } else { None }).collect();
    let paths: Vec<_> = items.iter().map(|i| i.meta.path.to_path_buf()).collect();
    let want: Vec<_> = positions.iter().map(|&p| listing[p].0.clone()).collect();
    assert_eq!(paths, want, "the tap sees the given order, through 2 decode workers");
    assert!(items.iter().all(|i| i.meta.epoch == 3));
    assert!(matches!(got.last(), Some(Envelope::EpochEnd(m)) if m.epoch == 3 && m.last));
    assert_eq!(report.stages[0].items_out, 4);
    let watched = watched.lock().unwrap();
    assert_eq!(
        watched.iter().map(|t| (t.stage.as_str(), t.total)).collect::<Vec<_>>(),
        [("files", Some(4)), ("decode", Some(4))]
    );
    assert_eq!(watched[0].count(), 4);
}

#[test]
fn a_tap_on_an_unknown_stage_is_an_error_naming_it() {
    let (tx, _rx) = crossbeam_channel::bounded(1);
    let hooks = RunHooks { taps: vec![("nope".into(), tx)], watch: None };
    let e = runtime::run_with(&graph(), &RunOptions { metrics: false, ..Default::default() }, hooks).err().unwrap();
    assert_eq!(e.to_string(), "stage `nope`: no such stage to tap");
}

#[test]
fn a_dropped_tap_stops_the_run_instead_of_blocking_it() {
    let (tx, rx) = crossbeam_channel::bounded(1);
    drop(rx);
    let hooks = RunHooks { taps: vec![("decode".into(), tx)], watch: None };
    let report = runtime::run_with(&graph(), &RunOptions { metrics: false, ..Default::default() }, hooks).unwrap();
    assert!(report.stages[1].items_out <= 1, "{:?}", report.stages[1].items_out);
}
