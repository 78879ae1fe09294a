//! Content-addressed feature store.
//!
//! Key = context (model file hash + every parameter that changes the input
//! tensor) + image content hash, so changed settings can never be served
//! stale features while a renamed or moved file still hits. Stored in redb:
//! copy-on-write B-trees with atomic commits, so a kill -9 loses at most the
//! batch being committed and never damages what is there. Every value
//! carries its own checksum so `convflow cache verify` can prove it.

pub mod shared;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::item::{Features, Meta};

const FEATURES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("features");
const CONTEXTS: TableDefinition<&[u8], &str> = TableDefinition::new("contexts");
const MAGIC: &[u8; 4] = b"CF01";
pub const FILE_NAME: &str = "features.redb";
const CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("feature cache {path}: {message}")]
    Store { path: PathBuf, message: String },
    /// The file is not a sound redb store (a damaged disk, a file cut or
    /// overwritten by hand). The message names the command that recovers.
    #[error(
        "feature cache {path}: the store is damaged ({message}); set it aside, and the next run builds a new one: mv {path} {path}.damaged"
    )]
    Damaged { path: PathBuf, message: String },
}

fn damaged(path: &Path, e: impl std::fmt::Display) -> CacheError {
    CacheError::Damaged { path: path.to_path_buf(), message: e.to_string() }
}

/// Is this redb error a damaged file rather than a busy or unwritable one?
fn is_damage(e: &redb::DatabaseError) -> bool {
    match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => true,
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

/// A redb error as [`CacheError::Damaged`] when it says the file is
/// corrupt, else as a plain store error (a full disk is not damage).
fn classify(path: &Path, e: impl Into<redb::Error>) -> CacheError {
    match e.into() {
        e @ redb::Error::Corrupted(_) => damaged(path, e),
        e => store_err(path, e),
    }
}

thread_local! {
    /// Set while [`guarded`] runs: a panic there is reported as damage, not printed.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a call into redb, which on some damaged pages panics (an
/// `unreachable!` in its B-tree code) instead of returning an error: the
/// panic becomes [`CacheError::Damaged`], never "a bug in this stage".
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, CacheError>) -> Result<T, CacheError> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    match result {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "redb panicked".into());
            Err(damaged(path, format!("redb: {why}")))
        }
    }
}

/// What a caching stage declares: where, and the part of the key it owns
/// (model hash, preprocessing). The runtime adds the upstream stages' part.
#[derive(Debug, Clone)]
pub struct CacheSpec {
    pub dir: PathBuf,
    pub key: String,
    /// The shared tier behind the local store: `s3://BUCKET/PREFIX` or a
    /// shared folder ([`shared`]).
    pub shared: Option<String>,
}

pub struct FeatureCache {
    db: Database,
    path: PathBuf,
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> CacheError {
    CacheError::Store { path: path.to_path_buf(), message: e.to_string() }
}

/// Can a cache live in `dir`? Checked with the pipeline (`convflow
/// validate`), so a run never starts with a cache it cannot write: `dir`, or
/// the nearest folder above it that exists, must be a folder this process
/// may write in, and a store already there a file it may write.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let store = dir.join(FILE_NAME);
    match std::fs::metadata(&store) {
        Ok(m) if m.is_file() => return writable(&store),
        Ok(_) => return Err(format!("{} is not a file", store.display())),
        Err(_) => {}
    }
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => return writable(at),
            Ok(_) => return Err(format!("{} is a file, not a folder", at.display())),
            // Missing (or below a file): the folder above decides.
            Err(e)
                if at != Path::new(".")
                    && matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) =>
            {
                at = match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
            }
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    }
}

/// `access(W_OK)`: permissions, and for root too a read-only mount.
fn writable(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{}: bad path", path.display()))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(format!("{} is not writable: {}", path.display(), std::io::Error::last_os_error()))
    }
}

/// Makes an empty store (its tables included) under a name of this process,
/// then links it into place: a kill while redb writes a new file's header
/// leaves that private file, never a `features.redb` that is not a database.
/// A link, not a rename, so that a store another process made meanwhile is
/// kept, not replaced. Private files of processes that are gone are removed.
fn create_atomically(dir: &Path, path: &Path) -> Result<(), CacheError> {
    let prefix = format!("{FILE_NAME}.creating.");
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|p| p.parse::<i32>().ok());
        // SAFETY: kill with signal 0 only checks that the process exists.
        if let Some(pid) = pid
            && unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let private = dir.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_file(&private);
    {
        let db = Database::create(&private).map_err(|e| store_err(&private, e))?;
        let txn = db.begin_write().map_err(|e| store_err(&private, e))?;
        txn.open_table(FEATURES).map_err(|e| store_err(&private, e))?;
        txn.open_table(CONTEXTS).map_err(|e| store_err(&private, e))?;
        txn.commit().map_err(|e| store_err(&private, e))?;
    }
    let linked = std::fs::hard_link(&private, path);
    let _ = std::fs::remove_file(&private);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(store_err(path, format!("cannot put the new store in place: {e}"))),
    }
}

impl FeatureCache {
    /// Opens the store in `dir`, made if missing. A store found damaged
    /// here is set aside (renamed `features.redb.damaged-<unix time>`, kept
    /// for inspection, named in the log) and a new one is built in its place.
    pub fn open(dir: &Path) -> Result<FeatureCache, CacheError> {
        match Self::open_store(dir) {
            Err(CacheError::Damaged { path, message }) => {
                let secs =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
                let aside = path.with_file_name(format!("{FILE_NAME}.damaged-{secs}"));
                std::fs::rename(&path, &aside)
                    .map_err(|e| store_err(&path, format!("damaged ({message}) and cannot be set aside: {e}")))?;
                tracing::warn!(
                    "feature cache {}: the store is damaged ({message}); set aside as {} and rebuilt (its features \
                     are computed again)",
                    path.display(),
                    aside.display()
                );
                Self::open_store(dir)
            }
            r => r,
        }
    }

    fn open_store(dir: &Path) -> Result<FeatureCache, CacheError> {
        std::fs::create_dir_all(dir).map_err(|e| store_err(dir, format!("cannot create the cache folder: {e}")))?;
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            create_atomically(dir, &path)?;
        }
        // redb's default page cache is 1 GiB; features are written once and
        // read once per run, so a small cache keeps memory flat with data size.
        let opened = guarded(&path, || {
            Database::builder().set_cache_size(CACHE_BYTES).create(&path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    store_err(&path, "in use by another convflow process; wait for it or use another cache_dir")
                }
                e if is_damage(&e) => damaged(&path, e),
                e => store_err(&path, e),
            })
        })?;
        let cache = FeatureCache { db: opened, path };
        // Create the tables up front so readers never see them missing, and
        // walk what every run touches first (the contexts, an insert, the
        // features' root), so damage there is found now, not mid-run.
        guarded(&cache.path, || {
            cache.write(|txn| {
                txn.open_table(FEATURES)?;
                txn.open_table(CONTEXTS)?;
                Ok(())
            })?;
            let err = |e: redb::Error| classify(&cache.path, e);
            let txn = cache.db.begin_write().map_err(|e| err(e.into()))?;
            {
                let mut contexts = txn.open_table(CONTEXTS).map_err(|e| err(e.into()))?;
                contexts.insert(&[0u8; 16][..], "probe").map_err(|e| err(e.into()))?;
                for entry in contexts.iter().map_err(|e| err(e.into()))? {
                    entry.map_err(|e| err(e.into()))?;
                }
                let features = txn.open_table(FEATURES).map_err(|e| err(e.into()))?;
                features.len().map_err(|e| err(e.into()))?;
                features.first().map_err(|e| err(e.into()))?;
            }
            txn.abort().map_err(|e| err(e.into()))
        })?;
        Ok(cache)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One atomic commit. A failure (a full disk, an I/O error) loses this
    /// transaction only: redb never overwrites committed pages in place.
    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> Result<(), CacheError> {
        let failed = |e: &dyn std::fmt::Display| {
            store_err(&self.path, format!("cannot commit: {e}; the entries committed before are intact"))
        };
        let txn = self.db.begin_write().map_err(|e| failed(&e))?;
        f(&txn).map_err(|e| failed(&e))?;
        txn.commit().map_err(|e| failed(&e))
    }

    /// A handle for one context; records its description for `cache stats`.
    /// `by_variant`: a random stage (augment) is upstream, so each augmented
    /// variant of an image has its own features.
    pub fn context(self: &Arc<Self>, description: &str, by_variant: bool) -> Result<CacheHandle, CacheError> {
        let hash = blake3::hash(description.as_bytes());
        let mut context = [0u8; 16];
        context.copy_from_slice(&hash.as_bytes()[..16]);
        guarded(&self.path, || {
            self.write(|txn| {
                txn.open_table(CONTEXTS)?.insert(&context[..], description)?;
                Ok(())
            })
        })?;
        Ok(CacheHandle {
            cache: self.clone(),
            context,
            by_variant,
            counters: Arc::new(CacheCounters::default()),
            shared: None,
        })
    }

    pub fn stats(&self) -> Result<CacheStats, CacheError> {
        guarded(&self.path, || self.stats_unguarded())
    }

    fn stats_unguarded(&self) -> Result<CacheStats, CacheError> {
        let txn = self.db.begin_read().map_err(|e| store_err(&self.path, e))?;
        let features = txn.open_table(FEATURES).map_err(|e| store_err(&self.path, e))?;
        let contexts = txn.open_table(CONTEXTS).map_err(|e| store_err(&self.path, e))?;
        let mut per_context: BTreeMap<[u8; 16], (u64, u64)> = BTreeMap::new();
        for entry in features.iter().map_err(|e| store_err(&self.path, e))? {
            let (k, v) = entry.map_err(|e| store_err(&self.path, e))?;
            let mut ctx = [0u8; 16];
            ctx.copy_from_slice(&k.value()[..16]);
            let slot = per_context.entry(ctx).or_default();
            slot.0 += 1;
            slot.1 += v.value().len() as u64;
        }
        let mut out = CacheStats {
            path: self.path.clone(),
            entries: features.len().map_err(|e| store_err(&self.path, e))?,
            file_bytes: std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0),
            contexts: Vec::new(),
        };
        for (ctx, (entries, bytes)) in per_context {
            let description = contexts
                .get(&ctx[..])
                .map_err(|e| store_err(&self.path, e))?
                .map(|d| d.value().to_string())
                .unwrap_or_else(|| "(unknown context)".into());
            out.contexts.push(ContextStats { id: hex(&ctx), description, entries, value_bytes: bytes });
        }
        Ok(out)
    }

    /// Checks the store's own structure, then every value's checksum.
    pub fn verify(dir: &Path) -> Result<VerifyReport, CacheError> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            return Err(store_err(&path, "no cache here"));
        }
        guarded(&path, || Self::verify_unguarded(&path))
    }

    fn verify_unguarded(path: &Path) -> Result<VerifyReport, CacheError> {
        let path = path.to_path_buf();
        let mut db =
            Database::create(&path).map_err(|e| if is_damage(&e) { damaged(&path, e) } else { store_err(&path, e) })?;
        let structure_ok =
            db.check_integrity().map_err(|e| if is_damage(&e) { damaged(&path, e) } else { store_err(&path, e) })?;
        let txn = db.begin_read().map_err(|e| store_err(&path, e))?;
        let features = txn.open_table(FEATURES).map_err(|e| store_err(&path, e))?;
        let mut report = VerifyReport { structure_ok, entries: 0, corrupt: Vec::new() };
        for entry in features.iter().map_err(|e| store_err(&path, e))? {
            let (k, v) = entry.map_err(|e| store_err(&path, e))?;
            report.entries += 1;
            if k.value().len() != 32 || decode_value(v.value()).is_none() {
                report.corrupt.push(hex(k.value()));
            }
        }
        Ok(report)
    }

    /// Deletes the store file. Refuses while another process holds it.
    pub fn clear(dir: &Path) -> Result<bool, CacheError> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            return Ok(false);
        }
        drop(FeatureCache::open(dir)?);
        std::fs::remove_file(&path).map_err(|e| store_err(&path, e))?;
        Ok(true)
    }
}

#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub writes: AtomicU64,
}

/// One context of one cache, shared by the stages that read and fill it.
#[derive(Clone)]
pub struct CacheHandle {
    cache: Arc<FeatureCache>,
    context: [u8; 16],
    by_variant: bool,
    pub counters: Arc<CacheCounters>,
    /// The shared tier behind the local store, if the pipeline names one.
    shared: Option<Arc<shared::SharedTier>>,
}

impl CacheHandle {
    /// Context + image identity. Variant 0, view 0 keeps the plain content
    /// hash, so the first variant and non-augmented flows share one key scheme.
    fn key(&self, meta: &Meta) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..16].copy_from_slice(&self.context);
        let variant = self.by_variant && meta.variant != 0;
        if variant || meta.view != 0 {
            let mut h = blake3::Hasher::new();
            h.update(&meta.content_hash);
            if variant {
                h.update(&meta.variant.to_le_bytes());
            }
            if meta.view != 0 {
                h.update(b"view").update(&[meta.view]);
            }
            k[16..].copy_from_slice(&h.finalize().as_bytes()[..16]);
        } else {
            k[16..].copy_from_slice(&meta.content_hash[..16]);
        }
        k
    }

    /// Looks behind the local store with `tier`: a miss there is answered
    /// from the shared tier, and what is computed is published to it.
    pub fn with_shared(mut self, tier: Arc<shared::SharedTier>) -> CacheHandle {
        self.shared = Some(tier);
        self
    }

    pub fn shared(&self) -> Option<&Arc<shared::SharedTier>> {
        self.shared.as_ref()
    }

    fn lookup(&self, meta: &Meta) -> Result<Option<Features>, CacheError> {
        let path = &self.cache.path;
        let key = self.key(meta);
        let local = guarded(path, || {
            let txn = self.cache.db.begin_read().map_err(|e| store_err(path, e))?;
            let table = txn.open_table(FEATURES).map_err(|e| store_err(path, e))?;
            let value = table.get(&key[..]).map_err(|e| store_err(path, e))?;
            Ok(value.and_then(|v| decode_value(v.value())))
        })?;
        if local.is_some() {
            return Ok(local);
        }
        let Some(tier) = &self.shared else { return Ok(None) };
        let Some(bytes) = tier.get(&key) else { return Ok(None) };
        // Sealed with its key (checked by `get`), and the value's own checksum.
        let Some(found) = decode_value(&bytes) else {
            tier.reject(&key, "holds a value that fails its checksum");
            return Ok(None);
        };
        tier.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.keep_local(&key, &bytes);
        Ok(Some(found))
    }

    /// Copies a shared-tier hit into the local store without a sync of its
    /// own (the shared tier still has it if a crash loses it), so a rerun on
    /// this machine does not ask the network again.
    fn keep_local(&self, key: &[u8; 32], value: &[u8]) {
        let write = || -> Result<(), String> {
            let mut txn = self.cache.db.begin_write().map_err(|e| e.to_string())?;
            txn.set_durability(redb::Durability::None).map_err(|e| e.to_string())?;
            txn.open_table(FEATURES).map_err(|e| e.to_string())?.insert(&key[..], value).map_err(|e| e.to_string())?;
            txn.commit().map_err(|e| e.to_string())
        };
        if let Err(e) = write() {
            tracing::warn!("{}: cannot keep a shared-tier hit locally: {e}", self.cache.path.display());
        }
    }

    /// Looks an image up and counts a hit or a miss. A value that fails its
    /// checksum is a miss (and is overwritten when the image is computed).
    pub fn get_counted(&self, meta: &Meta) -> Result<Option<Features>, CacheError> {
        let found = self.lookup(meta)?;
        let counter = if found.is_some() { &self.counters.hits } else { &self.counters.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(found)
    }

    /// Looks up again an item the source already counted as a miss: an
    /// earlier epoch's copy of it may have been stored since (items of the
    /// next epoch leave the source before the last one's are computed).
    /// A late hit turns that miss into a hit.
    pub fn recheck(&self, meta: &Meta) -> Result<Option<Features>, CacheError> {
        let found = self.lookup(meta)?;
        if found.is_some() {
            self.counters.misses.fetch_sub(1, Ordering::Relaxed);
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(found)
    }

    /// Stores many entries in one atomic, durable commit.
    pub fn put_many(&self, entries: &[(&Meta, &Features)]) -> Result<(), CacheError> {
        if entries.is_empty() {
            return Ok(());
        }
        let encoded: Vec<([u8; 32], Vec<u8>)> = entries.iter().map(|(m, f)| (self.key(m), encode_value(f))).collect();
        guarded(&self.cache.path, || {
            self.cache.write(|txn| {
                let mut table = txn.open_table(FEATURES)?;
                for (key, value) in &encoded {
                    table.insert(&key[..], &value[..])?;
                }
                Ok(())
            })
        })?;
        self.counters.writes.fetch_add(entries.len() as u64, Ordering::Relaxed);
        // Committed locally first: a failing shared tier loses nothing.
        if let Some(tier) = &self.shared {
            tier.put_many(encoded);
        }
        Ok(())
    }
}

fn encode_value(f: &Features) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 4 * f.shape.len() + 4 * f.data.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(f.shape.len() as u32).to_le_bytes());
    for &d in &f.shape {
        out.extend_from_slice(&(d as u32).to_le_bytes());
    }
    for &x in &f.data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn decode_value(bytes: &[u8]) -> Option<Features> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != sum || !body.starts_with(MAGIC) {
        return None;
    }
    let u32_at = |i: usize| -> Option<u32> { Some(u32::from_le_bytes(body.get(i..i + 4)?.try_into().ok()?)) };
    let ndim = u32_at(4)? as usize;
    let shape: Vec<usize> = (0..ndim).map(|d| u32_at(8 + 4 * d).map(|x| x as usize)).collect::<Option<_>>()?;
    let start = 8 + 4 * ndim;
    let data: Vec<f32> =
        body.get(start..)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (data.len() == shape.iter().product::<usize>()).then_some(Features { shape, data })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, serde::Serialize)]
pub struct CacheStats {
    pub path: PathBuf,
    pub entries: u64,
    pub file_bytes: u64,
    pub contexts: Vec<ContextStats>,
}

#[derive(Debug, serde::Serialize)]
pub struct ContextStats {
    pub id: String,
    pub description: String,
    pub entries: u64,
    pub value_bytes: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct VerifyReport {
    pub structure_ok: bool,
    pub entries: u64,
    pub corrupt: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.structure_ok && self.corrupt.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(hash: u8, variant: u32) -> Meta {
        Meta {
            path: std::path::Path::new("x.jpg").into(),
            content_hash: [hash; 32],
            label: None,
            split: None,
            epoch: 0,
            variant,
            view: 0,
            seq: 0,
        }
    }

    #[test]
    fn a_creation_killed_midway_leaves_no_store_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        // What a kill during creation leaves now: a private file of a process that is gone.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let torn = dir.path().join(format!("{FILE_NAME}.creating.{gone}"));
        std::fs::write(&torn, b"half a header").unwrap();
        let cache = FeatureCache::open(dir.path()).unwrap();
        assert!(!torn.exists(), "the dead process's private file is removed");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)], "only the store remains");
        drop(cache);
        // A store that exists but is not a database is never silently replaced:
        // it is set aside as it was (and the log names it), and a new one is built.
        std::fs::write(dir.path().join(FILE_NAME), b"not redb").unwrap();
        let cache = FeatureCache::open(dir.path()).expect("a new store beside the broken one");
        assert_eq!(cache.stats().unwrap().entries, 0);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(&format!("{FILE_NAME}.damaged-")))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(&aside[0]).unwrap(), b"not redb", "kept for inspection");
    }

    #[test]
    fn roundtrip_contexts_and_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(FeatureCache::open(dir.path()).unwrap());
        let a = cache.context("model A", false).unwrap();
        let b = cache.context("model B", false).unwrap();
        let f = Features { shape: vec![2, 2], data: vec![1.0, -2.0, 3.5, 0.0] };
        let img = meta(7, 0);
        a.put_many(&[(&img, &f)]).unwrap();
        assert_eq!(a.get_counted(&img).unwrap(), Some(f.clone()));
        assert_eq!(b.get_counted(&img).unwrap(), None, "another context never sees these features");
        assert_eq!(a.counters.hits.load(Ordering::Relaxed), 1);
        assert_eq!(a.get_counted(&meta(7, 3)).unwrap(), Some(f.clone()), "no random stage: variants share features");
        let stats = cache.stats().unwrap();
        assert_eq!(stats.entries, 1);
        assert_eq!(stats.contexts[0].description, "model A");

        let mut bad = encode_value(&f);
        bad[10] ^= 1;
        assert_eq!(decode_value(&bad), None);
        drop((a, b, cache));
        assert!(FeatureCache::verify(dir.path()).unwrap().is_clean());
    }

    #[test]
    fn each_augmented_variant_has_its_own_features() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(FeatureCache::open(dir.path()).unwrap());
        let aug = cache.context("augmented", true).unwrap();
        let (f0, f1) = (Features { shape: vec![1], data: vec![0.5] }, Features { shape: vec![1], data: vec![1.5] });
        aug.put_many(&[(&meta(7, 0), &f0), (&meta(7, 1), &f1)]).unwrap();
        assert_eq!(aug.get_counted(&meta(7, 0)).unwrap(), Some(f0));
        assert_eq!(aug.get_counted(&meta(7, 1)).unwrap(), Some(f1));
        assert_eq!(aug.get_counted(&meta(7, 2)).unwrap(), None);
        assert_eq!(aug.recheck(&meta(7, 2)).unwrap(), None);
        let counters = &aug.counters;
        assert_eq!((counters.hits.load(Ordering::Relaxed), counters.misses.load(Ordering::Relaxed)), (2, 1));
        assert!(aug.recheck(&meta(7, 1)).unwrap().is_some());
        assert_eq!((counters.hits.load(Ordering::Relaxed), counters.misses.load(Ordering::Relaxed)), (3, 0));
    }

    #[test]
    fn each_view_has_its_own_features_and_view_0_keeps_the_plain_key() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(FeatureCache::open(dir.path()).unwrap());
        for by_variant in [false, true] {
            let ctx = cache.context(&format!("views {by_variant}"), by_variant).unwrap();
            let mirrored = Meta { view: 1, ..meta(7, 0) };
            assert_eq!(ctx.key(&meta(7, 0))[16..], [7u8; 16], "view 0: the plain content hash");
            assert_ne!(ctx.key(&mirrored), ctx.key(&meta(7, 0)));
            assert_ne!(ctx.key(&mirrored), ctx.key(&Meta { view: 2, ..meta(7, 0) }));
            let (f0, f1) = (Features { shape: vec![1], data: vec![0.5] }, Features { shape: vec![1], data: vec![1.5] });
            ctx.put_many(&[(&meta(7, 0), &f0), (&mirrored, &f1)]).unwrap();
            assert_eq!(ctx.get_counted(&meta(7, 0)).unwrap(), Some(f0));
            assert_eq!(ctx.get_counted(&mirrored).unwrap(), Some(f1));
        }
        let aug = cache.context("augmented", true).unwrap();
        let view_of_variant = |v| Meta { view: 1, ..meta(7, v) };
        assert_ne!(aug.key(&view_of_variant(1)), aug.key(&view_of_variant(2)), "augmented variants stay apart");
        assert_ne!(aug.key(&view_of_variant(1)), aug.key(&meta(7, 1)));
    }

    #[test]
    fn check_dir_asks_the_nearest_folder_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_dir(&dir.path().join("a/b/c")), Ok(()));
        assert_eq!(check_dir(Path::new("no/such/relative/folder")), Ok(()), "the working folder decides");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = check_dir(&file.join("a/b")).unwrap_err();
        assert_eq!(err, format!("{} is a file, not a folder", file.display()));
    }
}
