//! The engine files under deploy/: the Kubernetes manifests render offline
//! and pass strict schema validation and the enum checks the schemas miss;
//! the Indexed Job's own command lines, run as N processes with
//! JOB_COMPLETION_INDEX (one killed mid-run and retried, as
//! backoffLimitPerIndex would), and the merge Job's, give what one process
//! gives. Slurm files are checked for the contract they rely on.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_venv() -> PathBuf {
    let p = common::root().join("deploy/.venv/bin");
    assert!(p.join("kubernetes-validate").exists(), "{} missing: run tests/setup.sh", p.display());
    p
}

fn render() -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", "deploy/k8s"])
        .current_dir(common::root())
        .output()
        .expect("kubectl missing: run tests/setup.sh (deploy/setup.sh installs it)");
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn validate(rendered: &str, dir: &Path) -> (bool, String) {
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, rendered).unwrap();
    let venv = deploy_venv();
    let schema = Command::new(venv.join("kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", "1.33.0"])
        .arg(&file)
        .output()
        .unwrap();
    let enums = Command::new(venv.join("python"))
        .arg(common::root().join("deploy/k8s/check_enums.py"))
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    let text = [&schema.stdout, &schema.stderr, &enums.stdout, &enums.stderr]
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect::<String>();
    (schema.status.success() && enums.status.success(), text)
}

#[test]
fn k8s_manifests_render_and_validate_strictly() {
    let tmp = tempfile::tempdir().unwrap();
    let rendered = render();
    for kind in ["kind: Job", "completionMode: Indexed", "backoffLimitPerIndex: 3", "nvidia.com/gpu: 1"] {
        assert!(rendered.contains(kind), "rendered manifests lack `{kind}`");
    }
    let (ok, text) = validate(&rendered, tmp.path());
    assert!(ok, "deploy/k8s does not validate:\n{text}");
    // The checks can fail: a misspelt field (schema) and a wrong enum value (ours).
    let (ok, text) = validate(&rendered.replace("backoffLimitPerIndex", "backoffLimitPerIdx"), tmp.path());
    assert!(!ok && text.contains("backoffLimitPerIdx"), "{text}");
    let (ok, text) = validate(&rendered.replace("completionMode: Indexed", "completionMode: Indexd"), tmp.path());
    assert!(!ok && text.contains("'Indexd'"), "{text}");
    let (ok, text) = validate(&rendered.replace("completions: 1000", "completions: 999"), tmp.path());
    assert!(!ok && text.contains("!= SHARDS 1000"), "{text}");
}

#[test]
fn k8s_pipeline_is_the_repository_pipeline() {
    let a = std::fs::read(common::root().join("deploy/k8s/pipeline.yaml")).unwrap();
    let b = std::fs::read(common::root().join("pipelines/extract_features.yaml")).unwrap();
    assert!(a == b, "deploy/k8s/pipeline.yaml must be a copy of pipelines/extract_features.yaml (cp it)");
}

/// The shell command (`args[0]` of `sh -c`) of a Job's container.
fn job_command(file: &str) -> String {
    let text = std::fs::read_to_string(common::root().join("deploy/k8s").join(file)).unwrap();
    let doc = convflow::config::yaml::parse(&text).unwrap().to_json();
    let c = &doc["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["command"], serde_json::json!(["/bin/sh", "-c"]), "{file}");
    c["args"][0].as_str().unwrap().to_string()
}

/// The run settings of the kustomization's `convflow-run` ConfigMap.
fn run_settings() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(common::root().join("deploy/k8s/kustomization.yaml")).unwrap();
    let doc = convflow::config::yaml::parse(&text).unwrap().to_json();
    let generator = doc["configMapGenerator"].as_array().unwrap().iter().find(|g| g["name"] == "convflow-run").unwrap();
    generator["literals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let (k, v) = l.as_str().unwrap().split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn tiny_pipeline(dir: &Path) -> PathBuf {
    let yaml = format!(
        "name: k8s
params:
  data_dir: data
  out_dir: out
  cache_dir: cache
  shared_cache: \"\"
report: ${{out_dir}}/report.json
stages:
  - id: files
    kind: file_reader
    dir: ${{data_dir}}
  - id: decode
    kind: decode
    input: files
  - id: resize
    kind: resize
    input: decode
    size: [64, 64]
  - id: batch
    kind: batch
    input: resize
    size: 2
  - id: features
    kind: onnx_features
    input: batch
    model: {model}
    preprocess: caffe
    device: cpu
    intra_threads: 1
    cache: ${{cache_dir}}
    shared_cache: ${{shared_cache}}
  - id: write
    kind: feature_writer
    input: features
    dir: ${{out_dir}}
",
        model = common::tiny_model().display()
    );
    common::write_pipeline(dir, "pipeline.yaml", &yaml)
}

#[test]
fn k8s_indexed_job_command_lines_run_as_processes_with_a_retried_index() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = common::root().join("tests/fixtures/images");
    let pipeline = tiny_pipeline(root);
    std::fs::create_dir_all(root.join("shared/feature-cache")).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_convflow")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let settings = run_settings();
    assert!(settings.contains_key("SHARDS") && settings.contains_key("LOCAL_CACHE"), "{settings:?}");
    // The manifests' own settings, pointed at this test's folders.
    let shards = 3;
    let env = |index: Option<u32>| -> Vec<(String, String)> {
        let mut e: Vec<(String, String)> = settings.clone().into_iter().collect();
        let local = format!("{}/scratch-{}/cache", root.display(), index.map(|i| i.to_string()).unwrap_or_default());
        for (k, v) in [
            ("SHARDS", shards.to_string()),
            ("PIPELINE", pipeline.display().to_string()),
            ("PLAN_DIR", root.join("shared/plan").display().to_string()),
            ("DATA_DIR", data.display().to_string()),
            ("OUT_DIR", root.join("shared/out").display().to_string()),
            ("LOCAL_CACHE", local),
            ("SHARED_CACHE", root.join("shared/feature-cache").display().to_string()),
            ("PATH", path.clone()),
        ] {
            e.retain(|(n, _)| n != k);
            e.push((k.to_string(), v));
        }
        if let Some(i) = index {
            e.push(("JOB_COMPLETION_INDEX".into(), i.to_string()));
        }
        e
    };
    let sh = |cmd: &str, index: Option<u32>| {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(cmd).current_dir(root).env_clear().envs(env(index));
        c
    };

    // One process, for the reference.
    let one = root.join("one");
    let status = common::bin()
        .args(["-q", "run"])
        .arg(&pipeline)
        .args(["--set", &format!("data_dir={}", data.display()), "--set", &format!("out_dir={}", one.display())])
        .args(["--set", &format!("cache_dir={}/one-cache", root.display())])
        .status()
        .unwrap();
    assert!(status.success());

    // The merge Job starts first and waits for the plan and every part.
    let merge = sh(&job_command("merge-job.yaml"), None).spawn().unwrap();
    assert!(sh(&job_command("plan-job.yaml"), None).status().unwrap().success(), "plan Job");
    assert!(sh(&job_command("plan-job.yaml"), None).status().unwrap().success(), "a rerun plan Job keeps the plan");

    let shard_cmd = job_command("extract-job.yaml");
    // Index 1's first pod dies (SIGKILL, as on a lost node) before it publishes.
    let mut doomed = sh(&shard_cmd, Some(1)).spawn().unwrap();
    let parts = root.join("shared/plan/parts");
    let started = std::time::Instant::now();
    while !std::fs::read_dir(&parts)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".part-00001"))
    {
        assert!(started.elapsed().as_secs() < 60, "shard 1 never started");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    assert!(!parts.join("part-00001-of-00003").exists(), "killed before publishing: nothing published");

    let pods: Vec<_> = (0..shards).map(|i| (i, sh(&shard_cmd, Some(i)).spawn().unwrap())).collect();
    for (i, mut p) in pods {
        assert!(p.wait().unwrap().success(), "index {i}");
    }
    let mut merge = merge;
    assert!(merge.wait().unwrap().success(), "merge Job");

    let out = root.join("shared/out");
    for f in ["features.npy", "labels.npy", "paths.txt", "classes.txt"] {
        assert!(std::fs::read(one.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(), "{f} differs");
    }
    // Every feature the shards computed is in the shared tier: a second
    // plan over the same photos, from fresh local caches, is all shared hits.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["merged_from_shards"], shards);
    assert!(std::fs::read_dir(root.join("shared/feature-cache/v2")).is_ok(), "features published to the shared tier");
}

#[test]
fn slurm_array_and_merge_follow_the_contract() {
    let dir = common::root().join("deploy/slurm");
    let extract = std::fs::read_to_string(dir.join("extract.sbatch")).unwrap();
    for needle in ["#SBATCH --array=0-999%16", "#SBATCH --gres=gpu:1", "#SBATCH --requeue", "--shard auto"] {
        assert!(extract.contains(needle), "extract.sbatch lacks `{needle}`");
    }
    let submit = std::fs::read_to_string(dir.join("submit.sh")).unwrap();
    assert!(submit.contains("--dependency=\"afterok:"), "the merge must wait for the array (afterok)");
    for f in ["extract.sbatch", "merge.sbatch", "submit.sh"] {
        let st = Command::new("bash").arg("-n").arg(dir.join(f)).status().unwrap();
        assert!(st.success(), "{f}: bash -n");
    }
}
