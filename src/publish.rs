//! An output folder convflow owns: where `feature_writer` and `merge`
//! publish, one writer at a time, every entry switched to a new version at
//! once.
//!
//! ```text
//! DIR/.convflow-output/OWNER            says: the published entries are convflow's
//! DIR/.convflow-output/lock             one writer at a time (flock), naming its holder
//! DIR/.convflow-output/current -> v-ID  the published version
//! DIR/.convflow-output/v-ID/train/...   a version's files; each run writes a fresh one
//! DIR/train -> .convflow-output/current/train   what users and later stages read
//! ```
//!
//! (Not `.convflow/`: that is where the default feature cache lives, and an
//! output folder may be the working directory.)
//!
//! Why a symbolic link switch: every published entry resolves through the
//! one `current` link, and rename(2) of a new link over it is atomic, so at
//! every instant all of DIR's entries belong to one complete version, old or
//! new, whatever is killed when. Renaming several folders into place (even
//! with a journal rolled forward by the next run) cannot promise that: a
//! reader, or a kill, between two renames sees a mix. A reader that opens
//! many files over a long time and must not straddle a later run can resolve
//! `DIR/.convflow-output/current` once and read below what it names.
//!
//! What convflow deletes: only what it made. An entry of DIR is convflow's
//! when it is a link to `.convflow-output/current/<its name>`; anything else where
//! a run would publish is refused before any work. Versions are removed only
//! inside a `.convflow-output` folder holding convflow's OWNER marker.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The folder of convflow's bookkeeping inside an output folder.
pub const META: &str = ".convflow-output";
const OWNER: &str = "OWNER";
const OWNER_TEXT: &str = "convflow output folder (format convflow-output/1)\n\
     The entries of the folder above that are links into .convflow-output/current are convflow's\n\
     published output; convflow replaces them on every run and touches nothing else.\n";
const LOCK: &str = "lock";
const CURRENT: &str = "current";

/// A claimed output folder: its lock is held and a fresh version folder is
/// ready for the files. Dropped unpublished, the version folder goes.
pub struct Output {
    dir: PathBuf,
    meta: PathBuf,
    version: String,
    staging: PathBuf,
    published: bool,
    /// Held for the claim's life; the kernel releases the lock if the process dies.
    _lock: File,
}

/// Where a published entry's link points.
fn link_target(name: &OsStr) -> PathBuf {
    Path::new(META).join(CURRENT).join(name)
}

/// Is `dir/name` free for convflow to publish (absent, or convflow's own link)?
pub fn check_entry(dir: &Path, name: &OsStr) -> Result<(), String> {
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
        Ok(m) if m.file_type().is_symlink() && std::fs::read_link(&path).ok() == Some(link_target(name)) => Ok(()),
        Ok(_) => Err(format!(
            "{} exists and is not convflow's output (convflow replaces only the entries it published, links into \
             {META}/current): move it away, or choose another output folder",
            path.display()
        )),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Syncs every file and folder below `dir` (the writers' files, two levels).
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        } else {
            File::open(e.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates or truncates within it.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { "?".into() }
}

/// Takes `meta/lock` without waiting, or says who holds it.
fn lock(meta: &Path, dir: &Path) -> Result<File, String> {
    let path = meta.join(LOCK);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this File owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(format!(
            "{} is being written by another convflow run ({}); wait for it to end, or choose another output folder",
            dir.display(),
            holder.trim()
        ));
    }
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let holder = format!("pid {} on {}, since unix time {since}\n", std::process::id(), hostname());
    file.set_len(0).and_then(|_| file.write_all(holder.as_bytes())).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(file)
}

/// `dir/.convflow-output`, made if missing; refused if it is not convflow's.
fn meta_folder(dir: &Path) -> Result<PathBuf, String> {
    let meta = dir.join(META);
    let owner = meta.join(OWNER);
    match std::fs::read_to_string(&owner) {
        Ok(text) if text == OWNER_TEXT => return Ok(meta),
        Ok(_) => {
            return Err(format!("{} is not convflow's marker: {} is not convflow's", owner.display(), meta.display()));
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("{}: {e}", owner.display())),
        Err(_) => {}
    }
    if std::fs::symlink_metadata(&meta).is_ok() {
        return Err(format!("{} exists but is not convflow's (it has no {OWNER} marker)", meta.display()));
    }
    std::fs::create_dir_all(&meta).map_err(|e| format!("cannot create {}: {e}", meta.display()))?;
    let tmp = meta.join(".OWNER.tmp");
    std::fs::write(&tmp, OWNER_TEXT)
        .and_then(|_| std::fs::rename(&tmp, &owner))
        .map_err(|e| format!("{}: {e}", owner.display()))?;
    Ok(meta)
}

impl Output {
    /// Claims `dir` before any work: refuses when one of `entries` (the
    /// names a run will publish, as far as known) is there and is not
    /// convflow's, or another run holds the folder; removes what killed
    /// runs left in `.convflow-output`; makes a fresh version folder.
    pub fn claim(dir: &Path, entries: &[OsString]) -> Result<Output, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for name in entries {
            check_entry(dir, name)?;
        }
        let meta = meta_folder(dir)?;
        let lock = lock(&meta, dir)?;
        let current = std::fs::read_link(meta.join(CURRENT)).ok();
        // Under the lock nobody else writes here: any other version is a killed run's.
        for e in std::fs::read_dir(&meta).map_err(|e| format!("{}: {e}", meta.display()))? {
            let Ok(e) = e else { continue };
            let name = e.file_name();
            let stale = name.as_bytes().starts_with(b"v-") && current.as_deref() != Some(Path::new(&name));
            if stale || name.as_bytes().starts_with(b"current.") {
                let _ = if stale { std::fs::remove_dir_all(e.path()) } else { std::fs::remove_file(e.path()) };
            }
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let version = format!("v-{nanos}-{}", std::process::id());
        let staging = meta.join(&version);
        std::fs::create_dir(&staging).map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
        Ok(Output { dir: dir.to_path_buf(), meta, version, staging, published: false, _lock: lock })
    }

    /// Where this run writes its entries (published by [`Output::publish`]).
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// The folder users read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the staged entries the published ones, all at once.
    pub fn publish(self) -> Result<(), String> {
        self.publish_with(&mut |_| Ok(()))
    }

    /// [`Output::publish`], calling `step` before each step that changes the
    /// folder (tests make it fail there, as a kill would stop the run).
    fn publish_with(mut self, step: &mut dyn FnMut(&str) -> std::io::Result<()>) -> Result<(), String> {
        let err = |path: &Path, e: std::io::Error| format!("publishing {}: {e}", path.display());
        sync_tree(&self.staging).map_err(|e| err(&self.staging, e))?;
        let mut names: Vec<OsString> = Vec::new();
        for e in std::fs::read_dir(&self.staging).map_err(|e| err(&self.staging, e))? {
            names.push(e.map_err(|e| err(&self.staging, e))?.file_name());
        }
        // 1. A link for each new entry. Until the switch it names nothing
        //    (the old version has no such entry), as before.
        for name in &names {
            check_entry(&self.dir, name)?;
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                step("link").map_err(|e| err(&self.dir, e))?;
                std::os::unix::fs::symlink(link_target(name), &link).map_err(|e| err(&link, e))?;
            }
        }
        sync_dir(&self.dir).map_err(|e| err(&self.dir, e))?;
        // 2. The switch: one rename.
        let old = std::fs::read_link(self.meta.join(CURRENT)).ok();
        let next = self.meta.join(format!("{CURRENT}.{}", self.version));
        step("switch").map_err(|e| err(&self.meta, e))?;
        std::os::unix::fs::symlink(&self.version, &next).map_err(|e| err(&next, e))?;
        std::fs::rename(&next, self.meta.join(CURRENT)).map_err(|e| err(&next, e))?;
        sync_dir(&self.meta).map_err(|e| err(&self.meta, e))?;
        self.published = true;
        // 3. Tidy: links to entries the new version lacks, then the old version.
        step("tidy").map_err(|e| err(&self.dir, e))?;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let ours = std::fs::read_link(e.path()).ok() == Some(link_target(&name));
                if ours && !names.contains(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if let Some(old) = old.filter(|o| o.as_os_str().as_bytes().starts_with(b"v-"))
            && let Err(e) = std::fs::remove_dir_all(self.meta.join(&old))
        {
            tracing::warn!("cannot remove the previous output {}: {e}", self.meta.join(old).display());
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// The path with `.`/`..` and links resolved as far as it exists, the rest appended.
fn resolved(path: &Path) -> PathBuf {
    let abs =
        if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    let mut rest = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(real) = at.canonicalize() {
            return rest.iter().rev().fold(real, |p, n| p.join(n));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            _ => return abs,
        }
    }
}

/// Is `out` the folder `input` or inside it (after resolving links)?
pub fn is_inside(out: &Path, input: &Path) -> bool {
    resolved(out).starts_with(resolved(input))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader of `dir` sees: each split's `rows` file, or None where absent.
    fn read(dir: &Path) -> Vec<Option<String>> {
        ["train", "validation", "test"].iter().map(|s| std::fs::read_to_string(dir.join(s).join("rows")).ok()).collect()
    }

    fn write_version(out: &Output, tag: &str, splits: &[&str]) {
        for s in splits {
            std::fs::create_dir_all(out.staging().join(s)).unwrap();
            std::fs::write(out.staging().join(s).join("rows"), format!("{tag} {s}")).unwrap();
        }
    }

    fn complete(tag: &str, splits: &[&str]) -> Vec<Option<String>> {
        ["train", "validation", "test"].iter().map(|s| splits.contains(s).then(|| format!("{tag} {s}"))).collect()
    }

    #[test]
    fn a_publish_stopped_at_any_step_leaves_the_old_or_the_new_output_whole() {
        for stop in ["link", "switch", "tidy", "never"] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("out");
            let old = Output::claim(&dir, &[]).unwrap();
            write_version(&old, "old", &["train", "validation"]);
            old.publish().unwrap();
            assert_eq!(read(&dir), complete("old", &["train", "validation"]));

            // The new version has a split more and one fewer: every kind of link changes.
            let new = Output::claim(&dir, &[]).unwrap();
            write_version(&new, "new", &["train", "test"]);
            let result = new.publish_with(&mut |s| {
                if s == stop { Err(std::io::Error::other("killed")) } else { Ok(()) }
            });
            let seen = read(&dir);
            let want = if ["link", "switch"].contains(&stop) {
                complete("old", &["train", "validation"])
            } else {
                complete("new", &["train", "test"])
            };
            assert_eq!(seen, want, "stopped before `{stop}`: {result:?}");

            // The next run cleans up whatever the stopped one left.
            let next = Output::claim(&dir, &[]).unwrap();
            write_version(&next, "next", &["validation"]);
            next.publish().unwrap();
            assert_eq!(read(&dir), complete("next", &["validation"]));
            let versions = std::fs::read_dir(dir.join(META))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().as_bytes().starts_with(b"v-"))
                .count();
            assert_eq!(versions, 1, "only the published version is kept");
        }
    }

    #[test]
    fn a_second_claim_is_refused_naming_the_holder_and_a_foreign_entry_is_never_touched() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let first = Output::claim(&dir, &[]).unwrap();
        let err = Output::claim(&dir, &[]).err().unwrap();
        assert!(err.contains("is being written by another convflow run (pid "), "{err}");
        drop(first);
        std::fs::create_dir_all(dir.join("train")).unwrap();
        std::fs::write(dir.join("train/mine.py"), "print(1)").unwrap();
        let err = Output::claim(&dir, &["train".into()]).err().unwrap();
        assert!(err.contains("train exists and is not convflow's output"), "{err}");
        // Found only at publish time (a split nobody predicted): refused, nothing touched.
        let out = Output::claim(&dir, &[]).unwrap();
        write_version(&out, "new", &["train"]);
        assert!(out.publish().unwrap_err().contains("is not convflow's output"));
        assert_eq!(std::fs::read_to_string(dir.join("train/mine.py")).unwrap(), "print(1)");
    }

    #[test]
    fn a_folder_named_like_ours_without_the_marker_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join(META).join("v-1")).unwrap();
        let err = Output::claim(tmp.path(), &[]).err().unwrap();
        assert!(err.contains("is not convflow's"), "{err}");
        assert!(tmp.path().join(META).join("v-1").exists());
    }

    #[test]
    fn inside_resolves_dots_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::os::unix::fs::symlink(&data, tmp.path().join("link")).unwrap();
        assert!(is_inside(&data, &data));
        assert!(is_inside(&tmp.path().join("link/new/out"), &data));
        assert!(is_inside(&tmp.path().join("data/../data/x"), &data));
        assert!(!is_inside(&tmp.path().join("out"), &data));
        assert!(!is_inside(&tmp.path().join("data2"), &data));
    }
}
