//! The shared cache tier on S3, against a real S3-protocol server (s3s-fs)
//! started here on 127.0.0.1: published by one run, served to the next,
//! and a server that goes away mid-run costs no computed feature.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper_util::rt::{TokioExecutor, TokioIo};

/// An s3s-fs server on 127.0.0.1 that, after `die_after` requests, closes
/// every connection and its listener: a server that went away.
struct Server {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(root: &Path, die_after: Option<usize>) -> Server {
        std::fs::create_dir_all(root.join("convflow")).unwrap(); // the bucket
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let fs = s3s_fs::FileSystem::new(root).unwrap();
        let counter = requests.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut b = s3s::service::S3ServiceBuilder::new(fs);
                b.set_auth(s3s::auth::SimpleAuth::from_single("test-key", "test-secret"));
                let service = b.build();
                let dead = Arc::new(tokio::sync::Notify::new());
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((socket, _)) = accepted else { continue };
                            let (service, counter, dead) = (service.clone(), counter.clone(), dead.clone());
                            let svc = hyper::service::service_fn(move |req| {
                                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                                if die_after.is_some_and(|d| n > d) {
                                    dead.notify_one();
                                }
                                hyper::service::Service::call(&service, req)
                            });
                            conns.spawn(async move {
                                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                                let _ = builder.serve_connection(TokioIo::new(socket), svc).await;
                            });
                        }
                        _ = dead.notified() => break,
                        _ = &mut stopped => break,
                    }
                }
                conns.abort_all();
            });
        });
        Server { addr, requests, stop: Some(stop), thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("s3://convflow/features?endpoint=http://{}&region=us-east-1", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pipeline(dir: &Path, name: &str, cache: &Path, shared: &str) -> std::path::PathBuf {
    let data = common::root().join("tests/fixtures/images");
    let out = dir.join(format!("out-{name}"));
    let yaml = common::extraction_yaml(&data, &common::tiny_model(), &out, Some(cache), "", 64, "caffe").replace(
        &format!("    cache: {}\n", cache.display()),
        &format!("    cache: {}\n    shared_cache: \"{shared}\"\n", cache.display()),
    );
    assert!(yaml.contains("shared_cache"), "{yaml}");
    common::write_pipeline(dir, &format!("{name}.yaml"), &yaml)
}

fn shared(report: &convflow::runtime::RunReport) -> convflow::cache::shared::SharedReport {
    report.cache.as_ref().and_then(|c| c.shared.clone()).expect("the report has the shared tier's counts")
}

#[test]
fn s3_tier_publishes_serves_and_survives_a_server_that_goes_away() {
    // SAFETY: this binary's only test, set before any thread of ours reads them.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test-key");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let server = Server::start(&dir.join("s3"), None);
    let a = common::run_yaml(&pipeline(dir, "a", &dir.join("cache-a"), &server.url())).unwrap();
    let s = shared(&a);
    assert_eq!((s.writes, s.hits, s.errors), (9, 0, 0), "{s:?}");
    // A fresh local store: every feature comes from S3, nothing is computed.
    let b = common::run_yaml(&pipeline(dir, "b", &dir.join("cache-b"), &server.url())).unwrap();
    let s = shared(&b);
    assert_eq!((s.writes, s.hits, s.errors), (0, 9, 0), "{s:?}");
    let cache = b.cache.as_ref().unwrap();
    assert_eq!((cache.hits, cache.misses, cache.writes), (9, 0, 0));
    for f in ["features.npy", "labels.npy", "paths.txt"] {
        assert!(std::fs::read(dir.join("out-a").join(f)).unwrap() == std::fs::read(dir.join("out-b").join(f)).unwrap());
    }
    drop(server);

    // A tier that cannot be reached: an error before any work.
    let gone = format!(
        "s3://convflow/features?endpoint=http://{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    );
    let err = match common::run_yaml(&pipeline(dir, "c", &dir.join("cache-c"), &gone)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a run against no server must not start"),
    };
    assert!(err.contains("shared_cache") && err.contains("cannot be reached"), "{err}");
    assert!(!dir.join("out-c").exists() && !dir.join("cache-c").exists(), "nothing ran");

    // A server that answers the probe and a few lookups, then goes away.
    let server = Server::start(&dir.join("s3-empty"), Some(6));
    let d = common::run_yaml(&pipeline(dir, "d", &dir.join("cache-d"), &server.url())).unwrap();
    assert!(server.requests.load(Ordering::SeqCst) > 6, "the server went away during the run");
    let s = shared(&d);
    assert!(s.errors > 0 && s.first_error.is_some(), "the failure is reported: {s:?}");
    let cache = d.cache.as_ref().unwrap();
    assert_eq!(cache.writes, 9, "every feature computed and kept in the local store");
    assert_eq!(
        std::fs::read(dir.join("out-a/features.npy")).unwrap(),
        std::fs::read(dir.join("out-d/features.npy")).unwrap()
    );
    // And they are there: a rerun on the local store alone computes nothing.
    let e = common::run_yaml(&pipeline(dir, "e", &dir.join("cache-d"), "")).unwrap();
    let cache = e.cache.as_ref().unwrap();
    assert_eq!((cache.hits, cache.misses), (9, 0));
    drop(server);
}
