//! The loops that drive one stage: a single actor thread, or a pool of
//! workers whose outputs are put back in input order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::Shared;
use crate::config::OnError;
use crate::item::{Item, Payload};
use crate::stage::{Emit, EpochEnd, Source, SourceContext, Stage, StageError, Stopped};
use crate::telemetry::{StageLabels, StageStats};

/// What an edge carries: items, and the end-of-epoch markers between them.
#[derive(Debug, Clone)]
pub enum Envelope {
    Item(Item),
    EpochEnd(EpochEnd),
}

/// Sends to every downstream stage; a full channel blocks (backpressure)
/// and the time blocked is counted.
pub struct Emitter {
    pub senders: Vec<Sender<Envelope>>,
    pub stats: Arc<StageStats>,
    pub metrics: EmitMetrics,
}

/// Pre-registered handles (no-ops when metrics are off).
pub struct EmitMetrics {
    pub items_out: metrics::Counter,
    /// The fill gauge of each downstream input channel, as `senders`.
    pub fills: Vec<metrics::Gauge>,
}

impl Emit for Emitter {
    fn emit(&mut self, item: Item) -> Result<(), Stopped> {
        let t = Instant::now();
        let n = item.image_count();
        self.send(Envelope::Item(item))?;
        self.stats.add_blocked(t.elapsed());
        self.stats.items_out.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.metrics.items_out.increment(n);
        for (s, g) in self.senders.iter().zip(&self.metrics.fills) {
            g.set(s.len() as f64);
        }
        Ok(())
    }

    fn end_epoch(&mut self, marker: EpochEnd) -> Result<(), Stopped> {
        let t = Instant::now();
        self.send(Envelope::EpochEnd(marker))?;
        self.stats.add_blocked(t.elapsed());
        Ok(())
    }
}

impl Emitter {
    fn send(&self, envelope: Envelope) -> Result<(), Stopped> {
        if let Some((last, rest)) = self.senders.split_last() {
            for s in rest {
                s.send(envelope.clone()).map_err(|_| Stopped)?;
            }
            last.send(envelope).map_err(|_| Stopped)?;
        }
        Ok(())
    }

    fn forward(&mut self, envelope: Envelope) -> Result<(), Stopped> {
        match envelope {
            Envelope::Item(item) => self.emit(item),
            Envelope::EpochEnd(marker) => self.end_epoch(marker),
        }
    }
}

/// Collects a worker's outputs so the pool can emit them in order.
#[derive(Default)]
struct Collect(Vec<Envelope>);

impl Emit for Collect {
    fn emit(&mut self, item: Item) -> Result<(), Stopped> {
        self.0.push(Envelope::Item(item));
        Ok(())
    }

    fn end_epoch(&mut self, marker: EpochEnd) -> Result<(), Stopped> {
        self.0.push(Envelope::EpochEnd(marker));
        Ok(())
    }
}

/// Everything one stage's loop needs besides the stage itself.
pub struct StageRun {
    pub id: String,
    /// `pipeline` and `stage`, for the error counters made on demand.
    pub labels: StageLabels,
    /// `metrics` handles (no-ops until an exporter is installed). The
    /// seconds are copied from `stats` by the runtime's wait loop.
    pub items_in: metrics::Counter,
    /// This stage's input channel.
    pub fill: metrics::Gauge,
    pub on_error: OnError,
    pub passes_precomputed: bool,
    pub shared: Arc<Shared>,
    pub stats: Arc<StageStats>,
}

impl StageRun {
    /// An item error is skipped and listed, or stops the run under `on_error: fail`.
    fn item_error(&self, e: StageError) -> bool {
        match e {
            StageError::Item { path, reason } => {
                let class = self.stats.add_error(&reason);
                if self.labels.enabled() {
                    self.labels.counter_with(crate::telemetry::ITEM_ERRORS, "reason", &class).increment(1);
                }
                if self.on_error == OnError::Fail {
                    self.shared.fail(&self.id, format!("{}: {reason} (on_error: fail)", path.display()));
                    return false;
                }
                tracing::warn!(stage = %self.id, path = %path.display(), "skipped: {reason}");
                self.shared.skip(&self.id, path, reason);
                true
            }
            StageError::Fatal(message) => {
                self.shared.fail(&self.id, message);
                false
            }
            StageError::Stopped => false,
        }
    }

    /// Cache hits flow past pure pixel stages untouched.
    fn passes(&self, item: &Item) -> bool {
        self.passes_precomputed && matches!(item.payload, Payload::Features(_))
    }

    fn recv(&self, rx: &Receiver<Envelope>) -> Option<Envelope> {
        let t = Instant::now();
        let envelope = rx.recv().ok();
        self.stats.add_wait(t.elapsed());
        self.fill.set(rx.len() as f64);
        if let Some(Envelope::Item(item)) = &envelope {
            self.stats.items_in.fetch_add(item.image_count(), std::sync::atomic::Ordering::Relaxed);
            self.items_in.increment(item.image_count());
        }
        envelope
    }

    /// Runs `f` and counts its time as busy, minus time blocked on output.
    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let blocked_before = self.stats.blocked_nanos();
        let t = Instant::now();
        let out = f();
        let blocked = std::time::Duration::from_nanos(self.stats.blocked_nanos() - blocked_before);
        self.stats.add_busy(t.elapsed().saturating_sub(blocked));
        out
    }

    pub fn source(&self, mut source: Box<dyn Source>, mut out: Emitter) {
        let skip = |e: StageError| {
            if !self.item_error(e) {
                self.shared.signals.aborted.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let ctx = SourceContext { signals: &self.shared.signals, skip: &skip };
        let result = self.timed(|| source.run(&mut out, &ctx));
        if let Err(e) = result {
            self.item_error(e);
        }
    }

    pub fn single(&self, mut stage: Box<dyn Stage>, rx: Receiver<Envelope>, mut out: Emitter) {
        while let Some(envelope) = self.recv(&rx) {
            if self.shared.signals.aborted() {
                return;
            }
            let result = self.timed(|| match envelope {
                Envelope::Item(item) if self.passes(&item) => out.emit(item).map_err(StageError::from),
                Envelope::Item(item) => stage.process(item, &mut out),
                Envelope::EpochEnd(marker) => {
                    stage.end_epoch(&marker, &mut out)?;
                    out.end_epoch(marker).map_err(StageError::from)
                }
            });
            if let Err(e) = result
                && !self.item_error(e)
            {
                return;
            }
        }
        if !self.shared.signals.aborted()
            && let Err(e) = self.timed(|| stage.finish(&mut out, &self.shared.signals))
        {
            self.item_error(e);
        }
        self.shared.summarize(&self.id, stage.summary());
    }

    /// `workers` copies take items from one queue; a collector re-orders
    /// their outputs by input position so the pool is invisible downstream.
    pub fn pool(self: Arc<Self>, stages: Vec<Box<dyn Stage>>, rx: Receiver<Envelope>, mut out: Emitter) {
        let n = stages.len();
        let (work_tx, work_rx) = bounded::<(u64, Item)>(n);
        let (done_tx, done_rx) = bounded::<(Option<u64>, Result<Vec<Envelope>, StageError>)>(n);
        // Markers skip the workers and take their place in the order directly.
        let marker_tx = done_tx.clone();
        std::thread::scope(|scope| {
            for mut stage in stages {
                let (work_rx, done_tx, me) = (work_rx.clone(), done_tx.clone(), self.clone());
                std::thread::Builder::new()
                    .name(format!("{}-worker", self.id))
                    .spawn_scoped(scope, move || {
                        for (i, item) in work_rx.iter() {
                            let mut collect = Collect::default();
                            let t = Instant::now();
                            let result = if me.passes(&item) {
                                collect.emit(item).map_err(StageError::from)
                            } else {
                                stage.process(item, &mut collect)
                            };
                            // Workers never block on output (the collector does), so all of it is busy time.
                            me.stats.add_busy(t.elapsed());
                            if done_tx.send((Some(i), result.map(|()| collect.0))).is_err() {
                                return;
                            }
                        }
                        let mut collect = Collect::default();
                        let result = match me.shared.signals.aborted() {
                            true => Ok(()),
                            false => stage.finish(&mut collect, &me.shared.signals),
                        };
                        let _ = done_tx.send((None, result.map(|()| collect.0)));
                        me.shared.summarize(&me.id, stage.summary());
                    })
                    .expect("spawning a worker thread");
            }
            drop((work_rx, done_tx));
            let me = self.clone();
            scope.spawn(move || {
                let mut i = 0u64;
                while let Some(envelope) = me.recv(&rx) {
                    let sent = match envelope {
                        Envelope::Item(item) => work_tx.send((i, item)).is_ok(),
                        Envelope::EpochEnd(marker) => {
                            marker_tx.send((Some(i), Ok(vec![Envelope::EpochEnd(marker)]))).is_ok()
                        }
                    };
                    if me.shared.signals.aborted() || !sent {
                        return;
                    }
                    i += 1;
                }
            });
            // Collector: emit in input order; finish() outputs come last.
            let mut next = 0u64;
            let mut waiting: BTreeMap<u64, Result<Vec<Envelope>, StageError>> = BTreeMap::new();
            let mut finished: Vec<Envelope> = Vec::new();
            let mut ok = true;
            for (i, result) in done_rx.iter() {
                if !ok {
                    continue;
                }
                match i {
                    Some(i) => {
                        waiting.insert(i, result);
                    }
                    None => match result {
                        Ok(items) => finished.extend(items),
                        Err(e) => ok = self.item_error(e),
                    },
                }
                while let Some(result) = waiting.remove(&next) {
                    next += 1;
                    let sent = match result {
                        Ok(items) => items.into_iter().try_for_each(|e| out.forward(e)).is_ok(),
                        Err(e) => self.item_error(e),
                    };
                    if !sent {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                for envelope in finished {
                    if out.forward(envelope).is_err() {
                        break;
                    }
                }
            }
        });
    }
}
