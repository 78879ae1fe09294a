//! `file_reader`: Keras `flow_from_directory` semantics. One sub-folder per
//! class, class names sorted -> label index, files sorted within a class.
//! Reads and hashes each file; with a cache probe, a known image leaves here
//! as finished features and skips decode and inference.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::cache::CacheHandle;
use crate::facts::{Facts, LabelFacts};
use crate::item::{ClassMode, Item, ItemKind, Label, Listed, Meta, Payload};
use crossbeam_channel::RecvTimeoutError;

use crate::stage::{
    BuildContext, Built, Emit, EpochEnd, FieldError, OptionDoc, PassFeed, Source, SourceContext, StageConfig,
    StageError,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReaderConfig {
    /// Folder with one sub-folder per class (or, with `splits`, one per split).
    pub dir: PathBuf,
    /// Sub-folders of `dir` read one after another, e.g. [train, validation, test].
    #[serde(default)]
    pub splits: Vec<String>,
    #[serde(default)]
    pub class_mode: ClassMode,
    #[serde(default = "default_extensions")]
    pub extensions: Vec<String>,
    #[serde(default)]
    pub shuffle: bool,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub follow_links: bool,
    /// Passes over the files; each ends with an end-of-epoch marker and,
    /// with `shuffle`, has its own order drawn from (seed, epoch).
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// Augmented variants per image. 0: every epoch draws fresh
    /// augmentation (the item's variant is its epoch). K > 0: each epoch
    /// picks one of K fixed variants per image from (seed, epoch, image), so
    /// a cache downstream computes at most K x images features, ever.
    #[serde(default)]
    pub variants: u32,
    /// Files larger than this many MiB are skipped (and listed) unread, so
    /// a run's memory is bounded by its options, not by what lies in the folder.
    #[serde(default = "default_max_file_mb", skip_serializing_if = "is_default_max_file_mb")]
    pub max_file_mb: u64,
}

fn default_epochs() -> u32 {
    1
}

fn default_max_file_mb() -> u64 {
    1024
}

/// The default is left out of the canonical options, so cache keys and
/// plans made before the option existed stay valid.
fn is_default_max_file_mb(mb: &u64) -> bool {
    *mb == default_max_file_mb()
}

/// Files above this size are checked from their first bytes before they
/// are read: a huge file that is no image costs nothing.
const SNIFF_ABOVE: u64 = 16 << 20;

const NOT_REGULAR: &str = "not a regular file (a device, FIFO or socket): not read";

/// Reads a file whole, unless it is over `max_mb` MiB or, large, does not
/// start like an image: then why it is skipped.
fn read_bounded(path: &Path, max_mb: u64) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek};
    // Checked before opening: opening a FIFO waits for a writer.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(NOT_REGULAR.into());
    }
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let len = file.metadata().map_err(|e| format!("cannot read: {e}"))?.len();
    let max = max_mb.saturating_mul(1 << 20);
    if len > max {
        return Err(format!("{len} bytes, over max_file_mb ({max_mb} MiB): not read"));
    }
    if len > SNIFF_ABOVE {
        let mut head = [0u8; 32];
        let n = file.read(&mut head).map_err(|e| format!("cannot read: {e}"))?;
        if image::guess_format(&head[..n]).is_err() {
            return Err(format!("not a recognised image format (its first bytes; the {len} bytes are not read)"));
        }
        file.rewind().map_err(|e| format!("cannot read: {e}"))?;
    }
    // Bounded even if the file grows after the size was read.
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("over max_file_mb ({max_mb} MiB) (it grew while read): not read"));
    }
    Ok(bytes)
}

fn default_extensions() -> Vec<String> {
    ["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"].iter().map(|s| s.to_string()).collect()
}

impl StageConfig for FileReaderConfig {
    const KIND: &'static str = "file_reader";
    const SUMMARY: &'static str = "lists images in class folders (Keras flow_from_directory), reads and hashes them";
    const ACCEPTS: &'static [ItemKind] = &[];
    const EMITS: Option<ItemKind> = Some(ItemKind::Bytes);
    const PLACE_OPTIONS: &'static [&'static str] = &["dir"];
    const LISTS_FILES: bool = true;
    const OPTIONS: &'static [OptionDoc] = &[
        OptionDoc { name: "dir", ty: "path", default: "(required)", help: "folder with one sub-folder per class" },
        OptionDoc { name: "splits", ty: "[string]", default: "[]", help: "read dir/<split>/<class>/ for each split" },
        OptionDoc { name: "class_mode", ty: "binary|categorical|none", default: "binary", help: "label encoding" },
        OptionDoc {
            name: "extensions",
            ty: "[string]",
            default: "[jpg, jpeg, png, ...]",
            help: "file extensions read",
        },
        OptionDoc { name: "shuffle", ty: "bool", default: "false", help: "shuffle the file order" },
        OptionDoc { name: "seed", ty: "int", default: "0", help: "shuffle seed" },
        OptionDoc {
            name: "follow_links",
            ty: "bool",
            default: "false",
            help: "walk linked folders below the class folders (linked files are always read, as in Keras)",
        },
        OptionDoc { name: "epochs", ty: "int", default: "1", help: "passes over the files, reshuffled each" },
        OptionDoc {
            name: "variants",
            ty: "int",
            default: "0 (fresh each epoch)",
            help: "K fixed augmented variants per image; each epoch draws one",
        },
        OptionDoc {
            name: "max_file_mb",
            ty: "int",
            default: "1024",
            help: "larger files are skipped unread (and listed); a large one that does not start like an image too",
        },
    ];

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.epochs == 0 {
            errors.push(FieldError::new("epochs", "must be at least 1"));
        }
        if self.max_file_mb == 0 {
            errors.push(FieldError::new("max_file_mb", "must be at least 1"));
        }
        errors
    }

    fn check_environment(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !self.dir.is_dir() {
            errors.push(FieldError::new("dir", format!("{} is not a folder", self.dir.display())));
        } else {
            for s in &self.splits {
                if !self.dir.join(s).is_dir() {
                    errors.push(FieldError::new("splits", format!("{} is not a folder", self.dir.join(s).display())));
                }
            }
        }
        errors
    }

    fn facts(&self, _input: &Facts, env: bool) -> Result<Facts, Vec<FieldError>> {
        // The class folders, when the folder is there to be listed.
        let classes = match (self.class_mode, env) {
            (ClassMode::None, _) | (_, false) => None,
            _ => class_names(&roots(self))
                .ok()
                .filter(|c| !c.is_empty())
                .map(|c| c.iter().map(|n| n.to_string_lossy().into_owned()).collect()),
        };
        Ok(Facts {
            labels: (self.class_mode != ClassMode::None).then_some(LabelFacts { mode: self.class_mode, classes }),
            splits: self.splits.clone(),
            epochs: self.epochs,
            shuffled: self.shuffle,
            variants: self.variants,
            views: 1,
            source_dir: Some(self.dir.clone()),
            ..Facts::default()
        })
    }

    /// The listing `convflow plan` writes into its manifest, in emission
    /// order. A dangling link stays in it: the shard that reads it skips and
    /// lists it (`cannot read: ...`).
    fn listing(&self) -> Result<Vec<Listed>, String> {
        Ok(list(self)?.into_iter().map(|e| (e.path, e.label, e.split)).collect())
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Built, StageError> {
        // A shard reads its range of the plan's listing instead of the folder.
        let listing: Vec<Entry> = match ctx.shard {
            Some(shard) => shard
                .items
                .iter()
                .cloned()
                .map(|(path, label, split)| Entry { path, label, split, problem: None })
                .collect(),
            None => list(self).map_err(StageError::fatal)?,
        };
        Ok(Built::Source(Box::new(FileReader {
            listing,
            probe: ctx.cache_probe.clone(),
            epochs: self.epochs,
            variants: self.variants,
            shuffle: self.shuffle,
            seed: self.seed,
            splits: self.splits.clone().into(),
            max_file_mb: self.max_file_mb,
            fed: ctx.passes.cloned(),
        })))
    }
}

struct Entry {
    path: PathBuf,
    label: Option<Label>,
    split: Option<Arc<str>>,
    /// Why this listed file cannot be read (a dangling symbolic link): it is
    /// skipped and listed with the reason when its turn comes.
    problem: Option<&'static str>,
}

/// The folders read: each split's, or `dir` itself.
fn roots(cfg: &FileReaderConfig) -> Vec<(Option<Arc<str>>, PathBuf)> {
    if cfg.splits.is_empty() {
        vec![(None, cfg.dir.clone())]
    } else {
        cfg.splits.iter().map(|s| (Some(Arc::from(s.as_str())), cfg.dir.join(s))).collect()
    }
}

/// The class folders of every root together, sorted (Keras's order), as
/// the bytes of their names: a name that is not UTF-8 is a class too.
fn class_names(roots: &[(Option<Arc<str>>, PathBuf)]) -> Result<Vec<OsString>, String> {
    let mut class_names: Vec<OsString> = Vec::new();
    for (_, root) in roots {
        for name in subfolders(root)? {
            if !class_names.contains(&name) {
                class_names.push(name);
            }
        }
    }
    class_names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(class_names)
}

/// Lists every file up front (paths only: small even for millions) so the
/// order and the class table are fixed before the first item leaves.
fn list(cfg: &FileReaderConfig) -> Result<Vec<Entry>, String> {
    let roots = roots(cfg);
    let class_names = class_names(&roots)?;
    let flat = class_names.is_empty();
    let mode = if flat { ClassMode::None } else { cfg.class_mode };
    if mode == ClassMode::Binary && class_names.len() != 2 {
        return Err(format!(
            "class_mode: binary needs exactly 2 class folders in {}, found {} ({})",
            cfg.dir.display(),
            class_names.len(),
            class_names.iter().map(|c| crate::names::escape(c.as_bytes())).collect::<Vec<_>>().join(", ")
        ));
    }
    // A class's name as labels, classes.txt and reports show it: escaped
    // (crate::names), the folder's own bytes read back from it exactly.
    let classes: Arc<[String]> = class_names.iter().map(|c| crate::names::escape(c.as_bytes())).collect();
    let exts: Vec<String> = cfg.extensions.iter().map(|e| e.trim_start_matches('.').to_ascii_lowercase()).collect();
    let mut entries = Vec::new();
    for (split, root) in &roots {
        let groups: Vec<(Option<u32>, PathBuf)> = if flat {
            vec![(None, root.clone())]
        } else {
            class_names
                .iter()
                .enumerate()
                .map(|(i, c)| (Some(i as u32), root.join(c)))
                .filter(|(_, p)| p.is_dir())
                .collect()
        };
        for (index, folder) in groups {
            let mut files = Vec::new();
            walk(&folder, &exts, cfg.follow_links, !flat, &mut files, &mut Vec::new())?;
            files.sort();
            entries.extend(files.into_iter().map(|(path, problem)| Entry {
                path,
                problem,
                label: match (index, mode) {
                    (Some(index), ClassMode::Binary | ClassMode::Categorical) => {
                        Some(Label { index, classes: classes.clone(), mode })
                    }
                    _ => None,
                },
                split: split.clone(),
            }));
        }
    }
    if entries.is_empty() {
        return Err(format!("no images with extensions [{}] under {}", exts.join(", "), cfg.dir.display()));
    }
    Ok(entries)
}

/// The class folders: as Keras's `os.path.isdir`, a symbolic link to a folder
/// is one whatever `follow_links` says (that governs the folders below).
fn subfolders(root: &Path) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(root).map_err(|e| format!("cannot list {}: {e}", root.display()))?;
    for entry in rd.flatten() {
        let is_dir = match entry.file_type() {
            Ok(t) if t.is_symlink() => entry.path().is_dir(),
            Ok(t) => t.is_dir(),
            Err(_) => false,
        };
        if is_dir {
            out.push(entry.file_name());
        }
    }
    Ok(out)
}

/// Deepest folder nesting walked (a guard for pathological trees).
const MAX_DEPTH: usize = 32;

/// Files with one of `exts`, as Keras lists them: a symbolic link to a file
/// is read like any file; one to a folder is walked only with `follow`
/// (Keras's `follow_links`); a dangling one with an image extension is kept
/// with its problem, to be skipped and listed rather than lost without a word.
///
/// `stack` holds the real paths of the folders being walked (its length is
/// the depth), so a symbolic link back to one of them is named as a loop
/// instead of recursing forever.
fn walk(
    dir: &Path,
    exts: &[String],
    follow: bool,
    recurse: bool,
    out: &mut Vec<(PathBuf, Option<&'static str>)>,
    stack: &mut Vec<PathBuf>,
) -> Result<(), String> {
    if stack.len() > MAX_DEPTH {
        return Err(format!("{}: folders nested deeper than {MAX_DEPTH}", dir.display()));
    }
    let real = std::fs::canonicalize(dir).map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    if stack.contains(&real) {
        return Err(format!("symlink loop: {} leads back to {}", dir.display(), real.display()));
    }
    stack.push(real);
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in rd.flatten() {
        let path = entry.path();
        let Ok(t) = entry.file_type() else { continue };
        let has_ext = || {
            let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            exts.contains(&ext)
        };
        if t.is_symlink() {
            if path.is_dir() {
                if follow && recurse {
                    walk(&path, exts, follow, recurse, out, stack)?;
                }
            } else if path.is_file() {
                if has_ext() {
                    out.push((path, None));
                }
            } else if has_ext() {
                // Neither a file nor a folder: gone, or a device or FIFO,
                // which reading would never end (/dev/zero) or block on.
                let problem = match std::fs::metadata(&path) {
                    Ok(_) => NOT_REGULAR,
                    Err(_) => "dangling symbolic link: its target does not exist",
                };
                out.push((path, Some(problem)));
            }
        } else if t.is_dir() && recurse {
            walk(&path, exts, follow, recurse, out, stack)?;
        } else if t.is_file() && has_ext() {
            out.push((path, None));
        }
    }
    stack.pop();
    Ok(())
}

struct FileReader {
    listing: Vec<Entry>,
    probe: Option<CacheHandle>,
    epochs: u32,
    variants: u32,
    shuffle: bool,
    seed: u64,
    splits: Arc<[String]>,
    max_file_mb: u64,
    /// Passes chosen from outside (the Python Loader's), instead of `epochs`.
    fed: Option<PassFeed>,
}

impl FileReader {
    /// The listing's order in `epoch`: sorted, or shuffled from (seed,
    /// epoch); epoch 0 uses the seed's own stream.
    fn order(&self, epoch: u32) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.listing.len()).collect();
        if self.shuffle {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch as u64);
            order.shuffle(&mut rng);
        }
        order
    }

    /// Which augmented variant of an image an epoch uses.
    fn variant(&self, epoch: u32, content_hash: &[u8; 32]) -> u32 {
        if self.variants == 0 {
            return epoch;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"convflow variant").update(&self.seed.to_le_bytes()).update(&epoch.to_le_bytes());
        h.update(content_hash);
        let draw = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or_default());
        (draw % self.variants as u64) as u32
    }
}

impl Source for FileReader {
    fn total(&self) -> Option<u64> {
        match &self.fed {
            Some(_) => None,
            None => Some(self.listing.len() as u64 * self.epochs as u64),
        }
    }

    fn passes(&self) -> u64 {
        if self.fed.is_some() { 1 } else { self.epochs as u64 }
    }

    fn run(&mut self, out: &mut dyn Emit, ctx: &SourceContext<'_>) -> Result<(), StageError> {
        if let Some(feed) = self.fed.clone() {
            return self.run_fed(&feed, out, ctx);
        }
        for epoch in 0..self.epochs {
            if epoch > 0 && ctx.signals.epochs_done.load(Ordering::Relaxed) {
                break;
            }
            let order = self.order(epoch);
            if !self.pass(epoch, &order, out, ctx, &|| false)? {
                return Ok(());
            }
            out.end_epoch(EpochEnd { epoch, splits: self.splits.clone(), last: epoch + 1 == self.epochs })?;
        }
        Ok(())
    }
}

impl FileReader {
    /// Makes the passes `feed` sends, each as it comes, until its sender is
    /// dropped; one cut short by the consumer ends at the next item.
    fn run_fed(&mut self, feed: &PassFeed, out: &mut dyn Emit, ctx: &SourceContext<'_>) -> Result<(), StageError> {
        loop {
            let order = match feed.passes.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(order) => order,
                Err(RecvTimeoutError::Timeout) if ctx.signals.should_stop() => return Ok(()),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            if let Some(bad) = order.positions.iter().find(|&&p| p >= self.listing.len()) {
                return Err(StageError::fatal(format!(
                    "position {bad} is past the {} files listed",
                    self.listing.len()
                )));
            }
            let cut = feed.cut.load(Ordering::Acquire);
            let cut_short = || feed.cut.load(Ordering::Acquire) != cut;
            if !self.pass(order.epoch, &order.positions, out, ctx, &cut_short)? {
                return Ok(());
            }
            out.end_epoch(EpochEnd { epoch: order.epoch, splits: self.splits.clone(), last: false })?;
        }
    }

    /// Emits the items at `positions` as epoch `epoch`, until `cut_short`
    /// says so; false when the run is stopping.
    fn pass(
        &self,
        epoch: u32,
        positions: &[usize],
        out: &mut dyn Emit,
        ctx: &SourceContext<'_>,
        cut_short: &dyn Fn() -> bool,
    ) -> Result<bool, StageError> {
        let n = self.listing.len() as u64;
        for (i, &index) in positions.iter().enumerate() {
            if ctx.signals.should_stop() {
                return Ok(false);
            }
            if cut_short() {
                break;
            }
            let entry = &self.listing[index];
            if let Some(problem) = entry.problem {
                (ctx.skip)(StageError::item(&entry.path, problem));
                continue;
            }
            let bytes = match read_bounded(&entry.path, self.max_file_mb) {
                Ok(b) => b,
                Err(why) => {
                    (ctx.skip)(StageError::item(&entry.path, why));
                    continue;
                }
            };
            let content_hash = *blake3::hash(&bytes).as_bytes();
            let meta = Meta {
                path: Arc::from(entry.path.as_path()),
                content_hash,
                label: entry.label.clone(),
                split: entry.split.clone(),
                epoch,
                variant: self.variant(epoch, &content_hash),
                view: 0,
                seq: epoch as u64 * n + i as u64,
            };
            let cached = match &self.probe {
                Some(probe) => probe.get_counted(&meta).map_err(StageError::fatal)?,
                None => None,
            };
            let payload = match cached {
                Some(features) => Payload::Features(features),
                None => Payload::Bytes(bytes.into()),
            };
            out.emit(Item { meta, payload })?;
        }
        Ok(true)
    }
}
