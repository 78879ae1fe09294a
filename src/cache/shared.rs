//! The shared cache tier: write-once, content-addressed objects behind each
//! process's own redb store, on a shared folder or S3, through `opendal`.
//!
//! The redb store takes an exclusive lock and must stay on a local disk;
//! this tier is what the workers of a sharded run share. Keys are the
//! store's keys; an object is the store's checksummed value sealed with its
//! own key ([`seal`]), so two workers racing on one key write the same bytes
//! and no lock is needed, and a torn object, or one copied, swapped or
//! planted under another key's name, reads as a miss: counted (`rejected`),
//! recomputed, never kept in the local store. The checksum is no signature:
//! whoever may write to the tier can still forge a well-formed object for a
//! key (docs/cache.md says what the tier does and does not protect against).
//!
//! A tier that cannot be reached stops the run before any work ([`open`]
//! writes and reads back a probe). One that fails during the run costs no
//! computed feature: every value is committed locally first, and the
//! failure is counted and named in the report. After a few failures in a
//! row the tier is left alone for the rest of the run, so a dead server
//! costs a few timeouts, not one per image.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::CacheError;

/// Each object operation gives up after this long (a hung server).
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Failures in a row after which the tier is given up for this run.
const GIVE_UP_AFTER: u32 = 3;

#[derive(Debug, Default)]
pub struct SharedCounters {
    pub hits: AtomicU64,
    pub writes: AtomicU64,
    pub errors: AtomicU64,
    /// Objects read that were not this key's (damaged, swapped, planted).
    pub rejected: AtomicU64,
    pub first_error: Mutex<Option<String>>,
    pub given_up: AtomicBool,
}

pub struct SharedTier {
    op: opendal::Operator,
    /// opendal is async; the stages are plain threads, so a small runtime
    /// of its own drives the calls.
    rt: tokio::runtime::Runtime,
    url: String,
    failures_in_a_row: AtomicU32,
    pub counters: SharedCounters,
}

fn tier_err(url: &str, message: impl std::fmt::Display) -> CacheError {
    CacheError::Store { path: url.into(), message: format!("shared cache tier: {message}") }
}

/// `s3://BUCKET/PREFIX[?endpoint=URL&region=R]` (else endpoint, region and
/// keys from the usual `AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), or a shared folder
/// (`file:///path` or a path).
fn operator(url: &str) -> Result<opendal::Operator, CacheError> {
    opendal::install_default();
    let built = if let Some(rest) = url.strip_prefix("s3://") {
        s3_operator(url, rest)?
    } else {
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.is_empty() {
            return Err(tier_err(url, "empty folder"));
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| tier_err(url, format!("{path}: {e} (create the shared folder first)")))?;
        if !meta.is_dir() {
            return Err(tier_err(url, format!("{path} is not a folder")));
        }
        // Objects are written beside and renamed into place: a reader never
        // sees half of one, even on NFS.
        let tmp = std::path::Path::new(path).join(".tmp");
        let b = opendal::services::Fs::default().root(path).atomic_write_dir(&tmp.to_string_lossy());
        opendal::Operator::new(b)
    };
    built.map_err(|e| tier_err(url, e))
}

/// Why an `s3://` tier cannot be used by this build, if it cannot.
pub const S3_NOT_BUILT: &str = "s3:// needs convflow built with its `s3` feature (S3's HTTP and TLS stack, \
                                off by default): cargo build --release --features s3";

#[cfg(not(feature = "s3"))]
fn s3_operator(url: &str, _rest: &str) -> Result<opendal::Result<opendal::Operator>, CacheError> {
    Err(tier_err(url, S3_NOT_BUILT))
}

#[cfg(feature = "s3")]
fn s3_operator(url: &str, rest: &str) -> Result<opendal::Result<opendal::Operator>, CacheError> {
    // First installed wins; S3 needs one (the fs service does not).
    opendal_http_transport_reqwest::install_default();
    Ok({
        // `?endpoint=URL&region=R` override the environment (MinIO, tests).
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let param =
            |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')).map(str::to_string);
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(tier_err(url, "no bucket: expected s3://BUCKET/PREFIX"));
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut b = opendal::services::S3::default().bucket(bucket).root(&format!("/{prefix}"));
        let region = param("region").or_else(|| env("AWS_REGION")).or_else(|| env("AWS_DEFAULT_REGION"));
        b = b.region(&region.unwrap_or_else(|| "us-east-1".into()));
        if let Some(e) = param("endpoint").or_else(|| env("AWS_ENDPOINT_URL_S3")).or_else(|| env("AWS_ENDPOINT_URL")) {
            b = b.endpoint(&e);
        }
        if let (Some(k), Some(s)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            b = b.access_key_id(&k).secret_access_key(&s);
        }
        opendal::Operator::new(b)
    })
}

/// The object for one store key: the context, then two levels of fan-out
/// so no folder (or listing) holds millions of entries. `v2`: sealed
/// objects; the unsealed `v1/` objects of earlier versions are not read.
fn object(key: &[u8; 32]) -> String {
    let h = super::hex(key);
    format!("v2/{}/{}/{}", &h[..32], &h[32..34], &h[34..])
}

const SEAL: &[u8; 4] = b"CFS2";

/// An object's bytes: magic, the key it is stored under, the store's value,
/// and a checksum over all three.
fn seal(key: &[u8; 32], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 32 + value.len() + 32);
    out.extend_from_slice(SEAL);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// The value in an object read for `key`, or why it is not one.
fn unseal<'a>(key: &[u8; 32], bytes: &'a [u8]) -> Result<&'a [u8], &'static str> {
    let body = bytes.len().checked_sub(32).map(|n| &bytes[..n]).ok_or("too short")?;
    if blake3::hash(body).as_bytes()[..] != bytes[body.len()..] || !body.starts_with(SEAL) || body.len() < 36 {
        return Err("fails its checksum");
    }
    if &body[4..36] != key {
        return Err("is stored under another key's name");
    }
    Ok(&body[36..])
}

impl SharedTier {
    /// Opens the tier and proves it works: a probe object is written, read
    /// back and deleted, so a wrong URL or missing credentials stop the run
    /// here, before any work.
    pub fn open(url: &str) -> Result<SharedTier, CacheError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shared-cache")
            .enable_all()
            .build()
            .map_err(|e| tier_err(url, format!("cannot start its I/O thread: {e}")))?;
        let tier = SharedTier {
            op: operator(url)?,
            rt,
            url: url.to_string(),
            failures_in_a_row: AtomicU32::new(0),
            counters: SharedCounters::default(),
        };
        let probe = format!("probe/{}-{}", std::process::id(), super::hex(&rand::random::<[u8; 8]>()));
        let body = b"convflow shared tier probe".to_vec();
        let op = tier.op.clone();
        let checked = tier.call(async move {
            op.write(&probe, body.clone()).await?;
            let back = op.read(&probe).await?.to_vec();
            op.delete(&probe).await?;
            Ok::<_, opendal::Error>(back == body)
        });
        match checked {
            Ok(true) => Ok(tier),
            Ok(false) => Err(tier_err(url, "the probe object read back different bytes")),
            Err(e) => Err(tier_err(url, format!("cannot be reached: {e}"))),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn call<T>(&self, f: impl Future<Output = Result<T, opendal::Error>>) -> Result<T, String> {
        // The timer is made inside the runtime: it needs its time driver.
        match self.rt.block_on(async move { tokio::time::timeout(OP_TIMEOUT, f).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
        }
    }

    fn failed(&self, what: &str, e: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.counters.first_error.lock() {
            first.get_or_insert_with(|| format!("{what}: {e}"));
        }
        let n = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= GIVE_UP_AFTER && !self.counters.given_up.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "shared cache tier {}: {n} failures in a row ({what}: {e}); using the local store only for the rest of \
                 the run (every computed feature is kept there)",
                self.url
            );
        } else {
            tracing::warn!("shared cache tier {}: {what}: {e}", self.url);
        }
    }

    fn live(&self) -> bool {
        !self.counters.given_up.load(Ordering::Relaxed)
    }

    /// Counts an object that is not `key`'s value, and says so.
    pub fn reject(&self, key: &[u8; 32], why: &str) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("shared cache tier {}: object {} {why}; recomputing", self.url, object(key));
    }

    /// The stored value for `key`, if the tier has it, unsealed. A missing
    /// object is a plain miss; one that is not `key`'s is rejected; any
    /// other failure is counted; all three are misses.
    pub fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        if !self.live() {
            return None;
        }
        let op = self.op.clone();
        let name = object(key);
        let got = self.call(async move {
            match op.read(&name).await {
                Ok(b) => Ok(Some(b.to_vec())),
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        });
        match got {
            Ok(v) => {
                self.failures_in_a_row.store(0, Ordering::Relaxed);
                match unseal(key, &v?) {
                    Ok(value) => Some(value.to_vec()),
                    Err(why) => {
                        self.reject(key, why);
                        None
                    }
                }
            }
            Err(e) => {
                self.failed(&format!("reading {}", object(key)), e);
                None
            }
        }
    }

    /// Publishes values already committed to the local store, concurrently.
    pub fn put_many(&self, entries: Vec<([u8; 32], Vec<u8>)>) {
        if !self.live() || entries.is_empty() {
            return;
        }
        let n = entries.len() as u64;
        let op = self.op.clone();
        let done = self.call(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (key, value) in entries {
                let op = op.clone();
                tasks.spawn(async move { op.write(&object(&key), seal(&key, &value)).await.map(|_| ()) });
            }
            while let Some(r) = tasks.join_next().await {
                r.map_err(|e| opendal::Error::new(opendal::ErrorKind::Unexpected, e.to_string()))??;
            }
            Ok(())
        });
        match done {
            Ok(()) => {
                self.failures_in_a_row.store(0, Ordering::Relaxed);
                self.counters.writes.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => self.failed(&format!("publishing {n} features"), e),
        }
    }
}

/// The shared tier's part of the run report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SharedReport {
    pub url: String,
    /// Local misses answered by the shared tier (counted as hits too).
    pub hits: u64,
    /// Features published to it.
    pub writes: u64,
    /// Failed operations; every computed feature is in the local store anyway.
    pub errors: u64,
    /// Objects that were not their key's (damaged, swapped, planted): misses.
    pub rejected: u64,
    pub given_up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl SharedReport {
    /// One tier's counters (a run has at most one per URL; the first is shown).
    pub fn of<'a>(handles: impl Iterator<Item = &'a super::CacheHandle>) -> Option<SharedReport> {
        let mut seen: Vec<*const SharedTier> = Vec::new();
        let mut out: Option<SharedReport> = None;
        for tier in handles.filter_map(|h| h.shared()) {
            if seen.contains(&std::sync::Arc::as_ptr(tier)) {
                continue;
            }
            seen.push(std::sync::Arc::as_ptr(tier));
            let c = &tier.counters;
            let r = out.get_or_insert_with(|| SharedReport {
                url: tier.url.clone(),
                hits: 0,
                writes: 0,
                errors: 0,
                rejected: 0,
                given_up: false,
                first_error: None,
            });
            r.hits += c.hits.load(Ordering::Relaxed);
            r.writes += c.writes.load(Ordering::Relaxed);
            r.errors += c.errors.load(Ordering::Relaxed);
            r.rejected += c.rejected.load(Ordering::Relaxed);
            r.given_up |= c.given_up.load(Ordering::Relaxed);
            if r.first_error.is_none() {
                r.first_error = c.first_error.lock().ok().and_then(|e| e.clone());
            }
        }
        out
    }

    pub fn line(&self) -> String {
        let mut s = format!("shared cache {}: {} hits, {} published", self.url, self.hits, self.writes);
        if self.rejected > 0 {
            s += &format!("; {} objects rejected (not their key's; recomputed)", self.rejected);
        }
        if self.errors > 0 {
            s += &format!(
                "; {} errors{} (computed features are all in the local store): {}",
                self.errors,
                if self.given_up { ", given up" } else { "" },
                self.first_error.as_deref().unwrap_or("")
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::FeatureCache;
    use crate::item::{Features, Meta};
    use std::sync::Arc;

    fn meta(hash: u8) -> Meta {
        Meta {
            path: std::path::Path::new("x.jpg").into(),
            content_hash: [hash; 32],
            label: None,
            split: None,
            epoch: 0,
            variant: 0,
            view: 0,
            seq: 0,
        }
    }

    #[test]
    fn unreachable_tier_is_an_error_at_open() {
        let err = SharedTier::open("/no/such/shared/folder").err().unwrap().to_string();
        assert!(err.contains("/no/such/shared/folder") && err.contains("create the shared folder first"), "{err}");
        let err = SharedTier::open("s3:///prefix").err().unwrap().to_string();
        assert!(err.contains("no bucket"), "{err}");
    }

    #[test]
    fn a_local_miss_is_answered_from_the_shared_tier_and_a_failing_tier_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let shared_dir = tmp.path().join("shared");
        std::fs::create_dir(&shared_dir).unwrap();
        let url = shared_dir.to_str().unwrap().to_string();
        let f = Features { shape: vec![2], data: vec![1.5, -2.0] };

        // Worker A computes and publishes.
        let a = Arc::new(FeatureCache::open(&tmp.path().join("a")).unwrap());
        let tier_a = Arc::new(SharedTier::open(&url).unwrap());
        let ha = a.context("ctx", false).unwrap().with_shared(tier_a.clone());
        ha.put_many(&[(&meta(1), &f)]).unwrap();
        assert_eq!(tier_a.counters.writes.load(Ordering::Relaxed), 1);

        // Worker B, fresh local store: a hit from the shared tier, kept locally.
        let b = Arc::new(FeatureCache::open(&tmp.path().join("b")).unwrap());
        let tier_b = Arc::new(SharedTier::open(&url).unwrap());
        let hb = b.context("ctx", false).unwrap().with_shared(tier_b.clone());
        assert_eq!(hb.get_counted(&meta(1)).unwrap(), Some(f.clone()));
        assert_eq!(tier_b.counters.hits.load(Ordering::Relaxed), 1);
        assert_eq!(hb.get_counted(&meta(2)).unwrap(), None, "absent everywhere: a plain miss, no error");
        assert_eq!(tier_b.counters.errors.load(Ordering::Relaxed), 0);
        let other_context = b.context("other ctx", false).unwrap().with_shared(tier_b.clone());
        assert_eq!(other_context.get_counted(&meta(1)).unwrap(), None, "the key holds the context");

        // The tier breaks mid-run (its folder replaced by a file): B's
        // computed features stay in B's own store, the failures are counted,
        // and after a few the tier is left alone.
        std::fs::remove_dir_all(&shared_dir).unwrap();
        std::fs::write(&shared_dir, b"not a folder").unwrap();
        for h in 10..15u8 {
            hb.put_many(&[(&meta(h), &f)]).unwrap();
        }
        let errors = tier_b.counters.errors.load(Ordering::Relaxed);
        assert_eq!(errors, GIVE_UP_AFTER as u64, "given up after {GIVE_UP_AFTER} failures in a row");
        assert!(tier_b.counters.given_up.load(Ordering::Relaxed));
        assert!(tier_b.counters.first_error.lock().unwrap().as_deref().unwrap().contains("publishing 1 features"));
        let local_only = b.context("ctx", false).unwrap();
        for h in 10..15u8 {
            assert_eq!(local_only.get_counted(&meta(h)).unwrap(), Some(f.clone()), "feature {h} kept locally");
        }
        let report = SharedReport::of([&hb].into_iter()).unwrap();
        assert!(report.line().contains("3 errors, given up"), "{}", report.line());
    }

    #[test]
    fn an_object_under_another_keys_name_or_unsealed_is_a_counted_miss_never_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let url = tmp.path().to_str().unwrap().to_string();
        let tier = Arc::new(SharedTier::open(&url).unwrap());
        let a = Arc::new(FeatureCache::open(&tmp.path().join("a")).unwrap());
        let ha = a.context("ctx", false).unwrap().with_shared(tier.clone());
        let (one, two) = (Features { shape: vec![1], data: vec![1.0] }, Features { shape: vec![1], data: vec![2.0] });
        ha.put_many(&[(&meta(1), &one), (&meta(2), &two)]).unwrap();
        let (k1, k2) = (ha.key(&meta(1)), ha.key(&meta(2)));
        let (p1, p2) = (tmp.path().join(object(&k1)), tmp.path().join(object(&k2)));
        // Swapped: each is a well-formed object, of the other key.
        let (b1, b2) = (std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        std::fs::write(&p1, &b2).unwrap();
        std::fs::write(&p2, &b1).unwrap();
        // An object in the unsealed form of earlier versions, under a third key.
        let k3 = ha.key(&meta(3));
        std::fs::create_dir_all(tmp.path().join(object(&k3)).parent().unwrap()).unwrap();
        std::fs::write(tmp.path().join(object(&k3)), super::super::encode_value(&one)).unwrap();

        let b = Arc::new(FeatureCache::open(&tmp.path().join("b")).unwrap());
        let hb = b.context("ctx", false).unwrap().with_shared(tier.clone());
        for m in [1, 2, 3] {
            assert_eq!(hb.get_counted(&meta(m)).unwrap(), None, "object {m} is not its key's: a miss");
        }
        assert_eq!(tier.counters.rejected.load(Ordering::Relaxed), 3);
        assert_eq!(tier.counters.hits.load(Ordering::Relaxed), 0);
        assert_eq!(hb.counters.misses.load(Ordering::Relaxed), 3);
        assert_eq!(b.stats().unwrap().entries, 0, "nothing rejected is kept locally");
        // Recomputed and published again, the objects are right.
        hb.put_many(&[(&meta(1), &one), (&meta(2), &two)]).unwrap();
        let c = Arc::new(FeatureCache::open(&tmp.path().join("c")).unwrap());
        let hc = c.context("ctx", false).unwrap().with_shared(tier.clone());
        assert_eq!(hc.get_counted(&meta(1)).unwrap(), Some(one));
        assert_eq!(hc.get_counted(&meta(2)).unwrap(), Some(two));
        assert!(SharedReport::of([&hb].into_iter()).unwrap().line().contains("3 objects rejected"));
    }
}
