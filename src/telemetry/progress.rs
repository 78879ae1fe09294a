//! Live progress of a run: items/s and ETA for every source and sink.
//! Bars (indicatif) when stderr is a terminal, a plain log line every few
//! seconds when it is not, nothing with `--quiet`.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use super::StageStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Nothing (the library default, and `--quiet`).
    #[default]
    Off,
    /// One bar per source and sink on stderr.
    Bars,
    /// A log line (through `tracing`, so `--log-format json` applies) this often.
    Lines(Duration),
}

impl ProgressMode {
    /// What the CLI uses: bars on a terminal, a line every 10 s otherwise.
    pub fn auto(quiet: bool) -> Self {
        if quiet {
            ProgressMode::Off
        } else if std::io::stderr().is_terminal() {
            ProgressMode::Bars
        } else {
            ProgressMode::Lines(Duration::from_secs(10))
        }
    }
}

/// Whether an entry counts what a source emitted or what a sink took in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Sink,
}

#[derive(Clone)]
pub struct Tracked {
    pub stage: String,
    pub role: Role,
    pub total: Option<u64>,
    /// The items of the first pass when `total` covers several (`None`: one
    /// pass). The first pass fills the feature caches and later ones come
    /// from them, many times faster (a fine-tuning run's is 10x its cached
    /// epochs): the ETA is measured after it, not extrapolated from it.
    pub first_pass: Option<u64>,
    pub stats: Arc<StageStats>,
}

impl Tracked {
    /// Items done so far: what a source emitted, what a sink took in.
    pub fn count(&self) -> u64 {
        match self.role {
            Role::Source => self.stats.items_out.load(Ordering::Relaxed),
            Role::Sink => self.stats.items_in.load(Ordering::Relaxed),
        }
    }
}

pub struct Progress {
    mode: ProgressMode,
    tracked: Vec<Tracked>,
    bars: Vec<ProgressBar>,
    _multi: Option<MultiProgress>,
    started: Instant,
    last_line: Instant,
    /// When each several-pass entry ended its first pass, and its count then.
    after_first_pass: Vec<Option<(Instant, u64)>>,
}

fn eta(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "?".into();
    }
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl Progress {
    /// What it watches (a source's items out, a sink's items in).
    pub fn tracked(&self) -> &[Tracked] {
        &self.tracked
    }

    pub fn new(mode: ProgressMode, tracked: Vec<Tracked>) -> Self {
        let now = Instant::now();
        let (multi, bars) = match mode {
            ProgressMode::Bars if !tracked.is_empty() => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
                let width = tracked.iter().map(|t| t.stage.len()).max().unwrap_or(0) + 9;
                let bars = tracked
                    .iter()
                    .map(|t| {
                        let prefix =
                            format!("{} ({})", t.stage, if t.role == Role::Source { "source" } else { "sink" });
                        let style = match t.total {
                            Some(_) => format!("{{prefix:<{width}}} [{{bar:30}}] {{pos}}/{{len}} {{rate}} {{msg}}"),
                            None => format!("{{prefix:<{width}}} {{spinner}} {{pos}} {{rate}}"),
                        };
                        let bar = multi.add(match t.total {
                            Some(n) => ProgressBar::new(n),
                            None => ProgressBar::no_length(),
                        });
                        let style = ProgressStyle::with_template(&style)
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> ")
                            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                                let _ = write!(w, "{:.1}/s", s.per_sec());
                            });
                        bar.set_style(style);
                        bar.set_prefix(prefix);
                        bar
                    })
                    .collect();
                (Some(multi), bars)
            }
            _ => (None, Vec::new()),
        };
        let after_first_pass = vec![None; tracked.len()];
        Progress { mode, tracked, bars, _multi: multi, started: now, last_line: now, after_first_pass }
    }

    /// Called often (every ~100 ms) by the runtime's wait loop; cheap.
    pub fn tick(&mut self) {
        if self.mode == ProgressMode::Off {
            return;
        }
        let now = Instant::now();
        self.note_first_passes(now);
        match self.mode {
            ProgressMode::Off => {}
            ProgressMode::Bars => {
                for (i, (t, bar)) in self.tracked.iter().zip(&self.bars).enumerate() {
                    bar.set_position(t.count());
                    if t.total.is_some() {
                        bar.set_message(self.eta(i, now));
                    }
                }
            }
            ProgressMode::Lines(every) => {
                if self.last_line.elapsed() >= every {
                    self.last_line = Instant::now();
                    tracing::info!("progress: {}", self.line());
                }
            }
        }
    }

    /// Records when each several-pass entry reached the end of its first pass.
    fn note_first_passes(&mut self, now: Instant) {
        for (t, mark) in self.tracked.iter().zip(&mut self.after_first_pass) {
            let n = t.count();
            if mark.is_none() && t.first_pass.is_some_and(|p| n >= p) {
                *mark = Some((now, n));
            }
        }
    }

    /// `ETA 1m05s` for entry `i`, at the rate since the start, or for
    /// several passes since the first ended; `ETA ?` while it is not known.
    fn eta(&self, i: usize, now: Instant) -> String {
        let t = &self.tracked[i];
        let (Some(total), n) = (t.total, t.count()) else { return String::new() };
        if n >= total {
            return "ETA 0s".into();
        }
        let (since, done_then) = match (t.first_pass, self.after_first_pass[i]) {
            (None, _) => (self.started, 0),
            (Some(_), Some(mark)) => mark,
            (Some(_), None) => return "ETA ? until pass 1 ends (later passes are cached)".into(),
        };
        let seconds = now.saturating_duration_since(since).as_secs_f64();
        let rate = n.saturating_sub(done_then) as f64 / seconds;
        format!("ETA {}", eta((total - n) as f64 / rate))
    }

    /// `files 120/160 (55.2/s, ETA 1s); write 100/160 (...)`
    pub fn line(&self) -> String {
        self.line_at(Instant::now())
    }

    fn line_at(&self, now: Instant) -> String {
        let elapsed = now.saturating_duration_since(self.started).as_secs_f64().max(1e-9);
        self.tracked
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let n = t.count();
                let rate = n as f64 / elapsed;
                match t.total {
                    Some(total) => format!("{} {n}/{total} ({rate:.1}/s, {})", t.stage, self.eta(i, now)),
                    None => format!("{} {n} ({rate:.1}/s)", t.stage),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Final positions; bars stay on screen, above the report table, and
    /// a log ends with a last line of the final counts.
    pub fn finish(&mut self) {
        let now = Instant::now();
        self.note_first_passes(now);
        for (i, (t, bar)) in self.tracked.iter().zip(&self.bars).enumerate() {
            bar.set_position(t.count());
            if t.total.is_some() {
                bar.set_message(self.eta(i, now));
            }
            bar.abandon();
        }
        if let ProgressMode::Lines(_) = self.mode {
            tracing::info!("progress: {}", self.line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_give_rate_and_eta() {
        let stats = Arc::new(StageStats::default());
        stats.items_out.store(50, Ordering::Relaxed);
        let p = Progress::new(
            ProgressMode::Off,
            vec![Tracked { stage: "files".into(), role: Role::Source, total: Some(100), first_pass: None, stats }],
        );
        std::thread::sleep(Duration::from_millis(20));
        let line = p.line();
        assert!(line.starts_with("files 50/100 ("), "{line}");
        assert!(line.contains("/s, ETA "), "{line}");
        assert_eq!(eta(65.0), "1m05s");
        assert_eq!(eta(f64::INFINITY), "?");
    }

    /// fine_tune.yaml: 130 passes, the first cold (~18 images/s through
    /// VGG16), the rest from the cache. Extrapolating the first said 10 hours
    /// for a run of about one.
    #[test]
    fn the_eta_of_several_passes_is_not_the_cold_first_pass_extrapolated() {
        let stats = Arc::new(StageStats::default());
        let tracked = Tracked {
            stage: "train_files".into(),
            role: Role::Source,
            total: Some(130 * 2000),
            first_pass: Some(2000),
            stats: stats.clone(),
        };
        let mut p = Progress::new(ProgressMode::Off, vec![tracked]);
        let t0 = p.started;
        // The cold pass, 18 items/s: the rest's speed is not known yet.
        stats.items_out.store(1000, Ordering::Relaxed);
        let at = t0 + Duration::from_secs(56);
        p.note_first_passes(at);
        let line = p.line_at(at);
        assert!(line.contains("ETA ? until pass 1 ends"), "{line}");
        // Pass 1 ends at 111 s; then 2000 items in 20 s from the cache.
        stats.items_out.store(2000, Ordering::Relaxed);
        p.note_first_passes(t0 + Duration::from_secs(111));
        stats.items_out.store(4000, Ordering::Relaxed);
        let line = p.line_at(t0 + Duration::from_secs(131));
        // 256,000 left at 100/s: 42m40s, not the 3h55m of 4000 items in 131 s.
        assert!(line.contains("ETA 42m40s"), "{line}");
    }
}
