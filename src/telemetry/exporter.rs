//! The process-wide Prometheus recorder, optionally served over HTTP at
//! `/metrics` (any path; `/health` answers `OK`), and the final snapshot.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The installed recorder: render it for a snapshot at any time.
#[derive(Clone)]
pub struct MetricsExporter {
    pub handle: PrometheusHandle,
    /// Where it is served, if anywhere.
    pub listen: Option<SocketAddr>,
}

impl MetricsExporter {
    /// Everything recorded so far, in the Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Writes [`Self::render`] to `path` (atomically: a scraper or a reader
    /// never sees half a file).
    pub fn write_snapshot(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("prom.tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(tmp, path)
    }
}

static INSTALLED: OnceLock<Mutex<Option<MetricsExporter>>> = OnceLock::new();

/// Installs the Prometheus recorder as the global `metrics` recorder (once
/// per process) and, with `listen`, serves it over HTTP from a small
/// background thread. A second call returns the same exporter; asking for
/// a different listen address then is an error.
pub fn install_prometheus(listen: Option<SocketAddr>) -> anyhow::Result<MetricsExporter> {
    let slot = INSTALLED.get_or_init(|| Mutex::new(None));
    let mut installed = slot.lock().map_err(|_| anyhow::anyhow!("metrics exporter lock poisoned"))?;
    if let Some(e) = installed.as_ref() {
        if listen.is_some() && listen != e.listen {
            anyhow::bail!(
                "the metrics exporter is already installed in this process (listening on {:?}); cannot also listen on {}",
                e.listen,
                listen.map(|a| a.to_string()).unwrap_or_default()
            );
        }
        return Ok(e.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(super::INFERENCE_BATCH_SECONDS.into()), super::INFERENCE_BUCKETS)?;
    let handle = match listen {
        None => {
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)?;
            // Histograms are drained into their buckets on render or upkeep.
            let upkeep = handle.clone();
            std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })?;
            handle
        }
        Some(addr) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (recorder, serve) = {
                let _guard = runtime.enter();
                builder.with_http_listener(addr).build().map_err(|e| {
                    anyhow::anyhow!(
                        "cannot serve metrics on {addr}: {e}; free it or choose another address \
                             (`metrics: {{listen: ...}}` in the pipeline, or --metrics-listen)"
                    )
                })?
            };
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)?;
            std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
                if let Err(e) = runtime.block_on(serve) {
                    tracing::error!("metrics endpoint stopped: {e:?}");
                }
            })?;
            tracing::info!("metrics: serving http://{addr}/metrics");
            handle
        }
    };
    super::describe();
    let exporter = MetricsExporter { handle, listen };
    *installed = Some(exporter.clone());
    Ok(exporter)
}

/// The exporter installed in this process, if any.
pub fn installed() -> Option<MetricsExporter> {
    INSTALLED.get().and_then(|m| m.lock().ok().and_then(|e| e.clone()))
}
