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

pub struct Tracked {
    pub stage: String,
    pub role: Role,
    pub total: Option<u64>,
    pub stats: Arc<StageStats>,
}

impl Tracked {
    fn count(&self) -> u64 {
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
                            Some(_) => format!("{{prefix:<{width}}} [{{bar:30}}] {{pos}}/{{len}} {{rate}} ETA {{eta}}"),
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
        Progress { mode, tracked, bars, _multi: multi, started: now, last_line: now }
    }

    /// Called often (every ~100 ms) by the runtime's wait loop; cheap.
    pub fn tick(&mut self) {
        match self.mode {
            ProgressMode::Off => {}
            ProgressMode::Bars => {
                for (t, bar) in self.tracked.iter().zip(&self.bars) {
                    bar.set_position(t.count());
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

    /// `files 120/160 (55.2/s, ETA 1s); write 100/160 (...)`
    pub fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        self.tracked
            .iter()
            .map(|t| {
                let n = t.count();
                let rate = n as f64 / elapsed;
                match t.total {
                    Some(total) => format!(
                        "{} {n}/{total} ({rate:.1}/s, ETA {})",
                        t.stage,
                        eta(total.saturating_sub(n) as f64 / rate)
                    ),
                    None => format!("{} {n} ({rate:.1}/s)", t.stage),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Final positions; bars stay on screen, above the report table, and
    /// a log ends with a last line of the final counts.
    pub fn finish(&mut self) {
        for (t, bar) in self.tracked.iter().zip(&self.bars) {
            bar.set_position(t.count());
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
            vec![Tracked { stage: "files".into(), role: Role::Source, total: Some(100), stats }],
        );
        std::thread::sleep(Duration::from_millis(20));
        let line = p.line();
        assert!(line.starts_with("files 50/100 ("), "{line}");
        assert!(line.contains("/s, ETA "), "{line}");
        assert_eq!(eta(65.0), "1m05s");
        assert_eq!(eta(f64::INFINITY), "?");
    }
}
