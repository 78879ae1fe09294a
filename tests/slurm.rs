//! A real Slurm, started by the test (tests/slurm/cluster.sh: munged,
//! slurmctld -D, slurmd -D in a private network namespace, ended by PID),
//! runs deploy/slurm/submit.sh: the plan, the array job over the photos
//! and the afterok merge. One task is killed mid-run and requeued. The
//! result is checked against one process.

mod common;

use std::path::Path;
use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

#[test]
fn slurm_array_job_and_afterok_merge_match_one_process() {
    let tools = ["sbatch", "slurmctld", "slurmd", "munged", "unshare", "ip"];
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if !missing.is_empty() || unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "missing on CI: {missing:?} (tests/setup.sh installs Slurm), or not root"
        );
        eprintln!("skipping: {missing:?} missing or not root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = common::root().join("tests/fixtures/images");
    let yaml = common::extraction_yaml(
        &data,
        &common::tiny_model(),
        Path::new("${out_dir}"),
        Some(Path::new("${cache_dir}")),
        "",
        64,
        "caffe",
    );
    let yaml = format!("params:\n  out_dir: out\n  cache_dir: cache\n  shared_cache: \"\"\n{yaml}")
        .replace("    cache: ${cache_dir}\n", "    cache: ${cache_dir}\n    shared_cache: ${shared_cache}\n");
    let pipeline = common::write_pipeline(d, "pipeline.yaml", &yaml);
    let one = d.join("one");
    let st = common::bin()
        .args(["-q", "run"])
        .arg(&pipeline)
        .args([
            "--set",
            &format!("out_dir={}", one.display()),
            "--set",
            &format!("cache_dir={}/one-cache", d.display()),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::create_dir(d.join("shared-cache")).unwrap();

    let root = common::root();
    let script = format!(
        r#"set -euo pipefail
cluster="{d}/cluster"
trap '"{root}/tests/slurm/cluster.sh" stop "$cluster"' EXIT
eval "$("{root}/tests/slurm/cluster.sh" start "$cluster")"
export PIPELINE="{pipeline}" PLAN_DIR="{d}/plan" SHARDS=4 PARALLEL=2
export CONVFLOW="{root}/tests/slurm/task-wrapper.sh" CONVFLOW_REAL="{bin}"
export SHARED_CACHE="{d}/shared-cache" TMPDIR="{d}/tmp"
mkdir -p "$TMPDIR"
export CONVFLOW_SET="--set out_dir={d}/out"
cd "{d}"
# This one node has 2 cores: the array's 4 CPUs / 8 GB per task shrink here.
ids="$("{root}/deploy/slurm/submit.sh" --partition=test --cpus-per-task=1 --mem=1G)"
echo "$ids"
merge="${{ids##* }}"
for _ in $(seq 1 600); do
  state="$(scontrol show job "$merge" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')"
  scontrol show job "$merge" | grep -q DependencyNeverSatisfied && {{ echo "an array task failed"; exit 1; }}
  case "$state" in COMPLETED) break ;; FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) echo "merge $state"; exit 1 ;; esac
  sleep 0.5
done
echo "merge job state: $state"
grep -h "killed mid-run" logs/* || {{ echo "task 1 was never killed"; exit 1; }}
test "$state" = COMPLETED
"#,
        d = d.display(),
        root = root.display(),
        pipeline = pipeline.display(),
        bin = env!("CARGO_BIN_EXE_convflow"),
    );
    let out = Command::new("unshare").args(["--net", "bash", "-c", &script]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let logs: String = std::fs::read_dir(d.join("logs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    format!("--- {}\n{}", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(out.status.success(), "{text}\n{logs}");
    for f in ["features.npy", "labels.npy", "paths.txt", "classes.txt"] {
        assert!(
            std::fs::read(one.join(f)).unwrap() == std::fs::read(d.join("out").join(f)).unwrap(),
            "{f} differs\n{text}"
        );
    }
}
