//! The real binary under kill -9 and Ctrl-C: the cache is never damaged,
//! nothing is lost or doubled, and the final outputs equal those of a run
//! that was never interrupted.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use convflow::cache::FeatureCache;

fn extract(data: &Path, out: &Path, cache: &Path) -> Command {
    let mut c = common::bin();
    c.args(["--quiet", "run", "pipelines/extract_features.yaml"])
        .arg("--set")
        .arg(format!("data_dir={}", data.display()))
        .arg("--set")
        .arg(format!("out_dir={}", out.display()))
        .arg("--set")
        .arg(format!("cache_dir={}", cache.display()))
        // VGG16 on 96x96 inputs: real work, slow enough to interrupt.
        .args(["--set", "image_size=96"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn spawn_and_wait(mut cmd: Command, ms: u64) -> Child {
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    child
}

fn outputs(out: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    ["train", "validation", "test"]
        .iter()
        .map(|s| {
            let d = out.join(s);
            (
                std::fs::read_to_string(d.join("paths.txt")).unwrap(),
                std::fs::read(d.join("features.npy")).unwrap(),
                std::fs::read(d.join("labels.npy")).unwrap(),
            )
        })
        .collect()
}

#[test]
fn kill_9_at_random_moments_loses_and_corrupts_nothing() {
    common::vgg16();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Four demo sets (640 images): the winograd engine does one set in
    // about 1.3 s here, and with one set three of the four kills came after
    // the run had ended.
    let sets = demo_data(&data, &[7, 17, 27, 37]) as usize / 160;
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");

    // Spread the kills over the run; a cheap LCG keeps the moments
    // reproducible. CI kills 4 times; tests/kill_loop.sh sets 20.
    let kills: usize = std::env::var("CONVFLOW_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let mut x: u64 = 12345;
    let mut landed = 0;
    for _ in 0..kills {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let ms = 100 + (x >> 33) % 1700;
        let mut child = spawn_and_wait(extract(&data, &out, &cache), ms);
        // Once the cache holds everything a run can finish before its kill.
        let still_running = child.try_wait().unwrap().is_none();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let verify = FeatureCache::verify(&cache).unwrap();
        assert!(verify.is_clean(), "after kill at {ms} ms: {verify:?}");
        landed += usize::from(still_running);
        // A kill can land while a finishing run renames its outputs into
        // place: whatever was published is whole, never a partial array.
        for (split, rows) in [("train", 80 * sets), ("validation", 40 * sets), ("test", 40 * sets)] {
            let f = out.join(split).join("features.npy");
            if f.exists() {
                assert_eq!(convflow::npy::read_f32(&f).unwrap().0[0], rows, "{split} published whole");
            }
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!("{landed} of {kills} kills landed mid-run");
    // The first three moments fall before the cache can be full (3.7 s,
    // set-up included, of runs that need about 5 s of work).
    assert!(landed >= kills.min(3), "only {landed} kills landed mid-run");
    let partial = FeatureCache::verify(&cache).unwrap().entries;

    let status = extract(&data, &out, &cache).status().unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["cache"]["hits"], partial, "everything committed before the kills is reused");

    let got = outputs(&out);
    let rows: Vec<usize> = got.iter().map(|(p, _, _)| p.lines().count()).collect();
    assert_eq!(rows, vec![80 * sets, 40 * sets, 40 * sets]);
    for (paths, _, _) in &got {
        let mut unique: Vec<&str> = paths.lines().collect();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), paths.lines().count(), "no row doubled");
    }

    let clean_out = tmp.path().join("clean");
    assert!(extract(&data, &clean_out, &tmp.path().join("clean-cache")).status().unwrap().success());
    assert!(got == outputs(&clean_out), "features equal those of an uninterrupted run");
}

/// The demo data set of each seed, merged into `dir` (file names prefixed
/// by the seed): `seeds.len()` x 160 distinct images. Returns how many.
fn demo_data(dir: &Path, seeds: &[u64]) -> u64 {
    let mut count = 0;
    for &seed in seeds {
        let one = dir.with_extension(format!("seed{seed}"));
        convflow::demo::generate(&one, seed).unwrap();
        for split in ["train", "validation", "test"] {
            for class in ["cats", "dogs"] {
                let to = dir.join(split).join(class);
                std::fs::create_dir_all(&to).unwrap();
                for e in std::fs::read_dir(one.join(split).join(class)).unwrap() {
                    let e = e.unwrap();
                    std::fs::rename(e.path(), to.join(format!("s{seed}-{}", e.file_name().to_string_lossy()))).unwrap();
                    count += 1;
                }
            }
        }
    }
    count
}

#[test]
fn ctrl_c_drains_flushes_the_cache_and_exits_130() {
    common::vgg16();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Three demo sets: the queues hold about 150 images once the first
    // rows are out, and the winograd engine empties them before the drain
    // ends, so a single set of 160 was often written whole.
    let total = demo_data(&data, &[8, 18, 28]);
    let (cache, out) = (tmp.path().join("cache"), tmp.path().join("out"));
    // Interrupt once the first batch is committed and written (a fixed delay
    // misses it on a loaded machine), with most of the run still ahead.
    // The queues are full by then: allow the drain all the time a loaded machine needs.
    let mut child = extract(&data, &out, &cache).args(["--drain-deadline", "300"]).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // The run's version folder, out/.convflow-output/v-*, once its first rows are written.
    let started = || {
        let Ok(entries) = std::fs::read_dir(out.join(".convflow-output")) else { return false };
        entries.flatten().any(|e| e.path().join("train/paths.txt.partial").exists())
    };
    while !started() {
        assert!(std::time::Instant::now() < deadline, "no rows after 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "interrupted exit code");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["interrupted"], true);
    assert!(!out.join("train/features.npy").exists(), "incomplete outputs are not published");
    let written = report["cache"]["writes"].as_u64().unwrap();
    let verify = FeatureCache::verify(&cache).unwrap();
    assert!(verify.is_clean());
    assert_eq!(verify.entries, written, "every feature computed before the interrupt was flushed");
    eprintln!("{written} of {total} written before the interrupt");
    assert!(written > 0 && written < total, "the interrupt landed mid-run ({written} of {total} written)");
}

#[test]
fn a_second_run_on_a_busy_cache_is_refused_and_the_first_completes() {
    common::vgg16();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Three demo sets, so the first run is still busy when the second
    // starts, however fast the engine.
    let total = demo_data(&data, &[9, 19, 29]);
    let cache = tmp.path().join("cache");
    let first = spawn_and_wait(extract(&data, &tmp.path().join("out1"), &cache), 700);
    let second = extract(&data, &tmp.path().join("out2"), &cache).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another convflow process"), "{err}");
    let status = first.wait_with_output().unwrap().status;
    assert!(status.success(), "the first run is not disturbed");
    assert!(FeatureCache::verify(&cache).unwrap().is_clean());
    assert_eq!(FeatureCache::verify(&cache).unwrap().entries, total);
}
