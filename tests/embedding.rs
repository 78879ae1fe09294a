//! What a program that embeds convflow (the Python package, python/) uses
//! of the library, held here so a change to the runtime or the file reader
//! shows up in `cargo test` and not only in pytest: a tap on a stage's
//! output, the progress counters, and a `file_reader` fed its passes one
//! at a time (the Loader's epochs, all in one run).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use convflow::config;
use convflow::graph::Graph;
use convflow::runtime::{self, Envelope, RunHooks, RunOptions};
use convflow::stage::{ExplicitOrder, PassFeed};
use convflow::stages::file_reader::FileReaderConfig;

fn graph() -> Graph {
    let dir = common::root().join("tests/fixtures/images");
    let text = format!(
        "name: embed\nchannel_capacity: 2\nstages:\n  - {{id: files, kind: file_reader, dir: {}}}\n  - {{id: decode, kind: decode, input: files, workers: 2}}\n",
        dir.display()
    );
    let cfg = config::parse_str(&text, std::path::Path::new("embed.yaml"), &[]).unwrap();
    Graph::build(cfg, &convflow::stages::builtin_registry()).unwrap()
}

fn tapped(envelopes: &[Envelope]) -> Vec<(std::path::PathBuf, u32)> {
    envelopes
        .iter()
        .filter_map(|e| if let Envelope::Item(i) = e { Some((i.meta.path.to_path_buf(), i.meta.epoch)) } else { None })
        .collect()
}

#[test]
fn a_fed_file_reader_makes_each_pass_it_is_sent_as_that_epoch_until_the_feed_closes() {
    let g = graph();
    let source: FileReaderConfig = serde_json::from_str(&g.stages[0].config.canonical_json()).unwrap();
    let listing = convflow::stage::StageConfig::listing(&source).unwrap();
    assert_eq!(listing.len(), 9);
    // A sampler's orders: repeats allowed (padding), files left out never read.
    let passes = [(3, vec![4, 0, 7, 4]), (3, vec![1]), (4, vec![8, 2])];
    let (send, passes_rx) = crossbeam_channel::unbounded();
    let feed = PassFeed { passes: passes_rx, cut: Arc::new(AtomicU64::new(0)) };

    let (tx, rx) = crossbeam_channel::bounded(2);
    let watched = Arc::new(Mutex::new(Vec::new()));
    let into = watched.clone();
    let hooks =
        RunHooks { taps: vec![("decode".into(), tx)], watch: Some(Box::new(move |t| *into.lock().unwrap() = t)) };
    let options = RunOptions { metrics: false, passes: Some(feed), ..Default::default() };
    let run = std::thread::spawn(move || runtime::run_with(&g, &options, hooks));
    // One pass at a time, each sent once the one before has ended: one run serves them all.
    let mut got = Vec::new();
    for (epoch, positions) in &passes {
        send.send(ExplicitOrder { epoch: *epoch, positions: positions.clone() }).unwrap();
        let mut this = Vec::new();
        loop {
            let e = rx.recv().unwrap();
            let end = matches!(&e, Envelope::EpochEnd(m) if m.epoch == *epoch && !m.last);
            this.push(e);
            if end {
                break;
            }
        }
        let want: Vec<_> = positions.iter().map(|&p| (listing[p].0.clone(), *epoch)).collect();
        assert_eq!(tapped(&this), want, "the tap sees the given order, through 2 decode workers");
        got.extend(this);
    }
    drop(send);
    assert!(rx.recv().is_err(), "the run ends when the feed closes");
    let report = run.join().unwrap().unwrap();
    assert_eq!(report.stages[0].items_out, 7);
    let watched = watched.lock().unwrap();
    assert_eq!(
        watched.iter().map(|t| (t.stage.as_str(), t.total)).collect::<Vec<_>>(),
        [("files", None), ("decode", None)],
        "how many items a fed source makes is not known up front"
    );
    assert_eq!(watched[0].count(), 7);
}

#[test]
fn a_pass_cut_short_ends_at_the_next_item_and_the_next_pass_follows() {
    let g = graph();
    let (send, passes_rx) = crossbeam_channel::unbounded();
    let cut = Arc::new(AtomicU64::new(0));
    let feed = PassFeed { passes: passes_rx, cut: cut.clone() };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let hooks = RunHooks { taps: vec![("decode".into(), tx)], watch: None };
    let options = RunOptions { metrics: false, passes: Some(feed), ..Default::default() };
    let run = std::thread::spawn(move || runtime::run_with(&g, &options, hooks));
    // A long pass (every file, eight times over), of which the consumer reads one item.
    send.send(ExplicitOrder { epoch: 0, positions: (0..72).map(|i| i % 9).collect() }).unwrap();
    assert!(matches!(rx.recv().unwrap(), Envelope::Item(i) if i.meta.epoch == 0));
    cut.fetch_add(1, Ordering::AcqRel);
    send.send(ExplicitOrder { epoch: 1, positions: vec![5, 6] }).unwrap();
    let mut rest = Vec::new();
    loop {
        let e = rx.recv().unwrap();
        let end = matches!(&e, Envelope::EpochEnd(m) if m.epoch == 1);
        rest.push(e);
        if end {
            break;
        }
    }
    let first = rest.iter().position(|e| matches!(e, Envelope::EpochEnd(m) if m.epoch == 0)).unwrap();
    // What was in flight when the cut came (the channels hold a few), not the other 71.
    assert!(first < 12, "the cut pass went on for {first} more items");
    assert_eq!(tapped(&rest[first..]).iter().map(|(_, e)| *e).collect::<Vec<_>>(), [1, 1]);
    drop(send);
    let report = run.join().unwrap().unwrap();
    assert!(report.stages[0].items_out < 15, "{}", report.stages[0].items_out);
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
