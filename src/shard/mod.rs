//! Sharded runs: one pipeline file run as N independent processes (Slurm
//! job arrays, Kubernetes Indexed Jobs, AWS / GCP Batch arrays), then one
//! merge that writes exactly what a single process would have written.
//!
//! convflow is not a cluster manager; the engine hands each task an index
//! and this module turns it into work:
//!
//! - [`plan`]: `convflow plan` lists the source once into a manifest, so N
//!   workers never each list millions of files, and fixes N.
//! - [`ShardSpec`]: `--shard I/N` or `--shard auto` (the engine's variables).
//! - The partition: shard I reads the contiguous range
//!   `[I*M/N, (I+1)*M/N)` of the manifest's M entries. Contiguous ranges
//!   (rather than position modulo N or content-hash ranges) make the merge
//!   a concatenation of the parts in shard order: one part open at a time,
//!   sequential reads, no k-way interleave over 10,000 open files. The
//!   balance is what many more shards than GPUs buys anyway.
//! - [`part`]: each shard publishes its outputs as a part, atomically, with
//!   its marker written last; a finished part is never redone.
//! - [`merge`]: checks every part and streams the final files.

pub mod fingerprint;
pub mod manifest;
pub mod merge;
pub mod part;
pub mod plan;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the file reader of a shard reads instead of listing its folder:
/// entries `[start, end)` of the manifest in `plan_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInput {
    pub plan_dir: PathBuf,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShardError {
    #[error("--shard {0}: {1}")]
    Spec(String, String),
    #[error("--shard auto: {0}")]
    Auto(String),
}

/// `--shard I/N`, or `--shard auto` / `auto/N` to read the engine's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSpec {
    Fixed { index: u64, count: u64 },
    Auto { count: Option<u64> },
}

impl std::str::FromStr for ShardSpec {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, ShardError> {
        let bad = |m: &str| ShardError::Spec(s.to_string(), m.to_string());
        let number = |t: &str, what: &str| -> Result<u64, ShardError> {
            t.trim().parse::<u64>().map_err(|_| bad(&format!("{what} `{t}` is not a whole number")))
        };
        if s == "auto" {
            return Ok(ShardSpec::Auto { count: None });
        }
        let Some((i, n)) = s.split_once('/') else {
            return Err(bad("expected I/N (e.g. 3/16), auto, or auto/N"));
        };
        let count = number(n, "N")?;
        if count == 0 {
            return Err(bad("N must be at least 1"));
        }
        if i == "auto" {
            return Ok(ShardSpec::Auto { count: Some(count) });
        }
        let index = number(i, "I")?;
        if index >= count {
            return Err(bad(&format!("I must be below N (shards are numbered 0..{})", count - 1)));
        }
        Ok(ShardSpec::Fixed { index, count })
    }
}

/// Index and count variables of the engines `--shard auto` understands,
/// tried in this order. `None` for the count: the engine does not export
/// one (Kubernetes), so it must come from `--shard auto/N`.
pub const ENGINES: &[(&str, &str, Option<&str>)] = &[
    ("Slurm job array", "SLURM_ARRAY_TASK_ID", Some("SLURM_ARRAY_TASK_COUNT")),
    ("Kubernetes Indexed Job", "JOB_COMPLETION_INDEX", None),
    ("AWS Batch array job", "AWS_BATCH_JOB_ARRAY_INDEX", Some("AWS_BATCH_JOB_ARRAY_SIZE")),
    ("GCP Batch", "BATCH_TASK_INDEX", Some("BATCH_TASK_COUNT")),
];

impl ShardSpec {
    /// The shard's (index, count), reading the environment through `env`
    /// for `auto` (a function, so tests need not touch the process's own).
    pub fn resolve(self, env: &dyn Fn(&str) -> Option<String>) -> Result<(u64, u64), ShardError> {
        let given = match self {
            ShardSpec::Fixed { index, count } => return Ok((index, count)),
            ShardSpec::Auto { count } => count,
        };
        let Some(&(engine, index_var, count_var)) = ENGINES.iter().find(|(_, i, _)| env(i).is_some()) else {
            let names: Vec<&str> = ENGINES.iter().map(|(_, i, _)| *i).collect();
            return Err(ShardError::Auto(format!(
                "none of {} is set: run under an array engine or give --shard I/N",
                names.join(", ")
            )));
        };
        let read = |var: &str| -> Result<u64, ShardError> {
            let v = env(var).unwrap_or_default();
            v.trim().parse::<u64>().map_err(|_| ShardError::Auto(format!("{var}=`{v}` is not a whole number")))
        };
        let index = read(index_var)?;
        let from_env = match count_var {
            Some(var) if env(var).is_some() => Some((var, read(var)?)),
            _ => None,
        };
        let count = match (from_env, given) {
            (Some((var, n)), Some(g)) if n != g => {
                return Err(ShardError::Auto(format!("{var}={n} but the command line says auto/{g}")));
            }
            (Some((_, n)), _) => n,
            (None, Some(g)) => g,
            (None, None) => {
                let why = match count_var {
                    Some(var) => format!("{var} is not set"),
                    None => format!("{engine}s do not export a task count"),
                };
                return Err(ShardError::Auto(format!(
                    "{index_var} is set but {why}: give the count as --shard auto/N"
                )));
            }
        };
        if count == 0 {
            return Err(ShardError::Auto(format!("{engine}: the task count is 0")));
        }
        if index >= count {
            let hint = if index_var.starts_with("SLURM") { " (number the array from 0: --array=0-N-1)" } else { "" };
            return Err(ShardError::Auto(format!("{index_var}={index} is not below the count {count}{hint}")));
        }
        Ok((index, count))
    }
}

/// Entries `[start, end)` of `items` that shard `index` of `count` reads.
pub fn range(index: u64, count: u64, items: u64) -> (u64, u64) {
    let at = |i: u64| (i as u128 * items as u128 / count as u128) as u64;
    (at(index), at(index + 1))
}

/// The folder name of a part: sorted listings show the shards in order.
pub fn part_name(index: u64, count: u64) -> String {
    format!("part-{index:05}-of-{count:05}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn fixed_specs_and_their_errors() {
        assert_eq!("3/16".parse(), Ok(ShardSpec::Fixed { index: 3, count: 16 }));
        assert_eq!("auto".parse(), Ok(ShardSpec::Auto { count: None }));
        assert_eq!("auto/8".parse(), Ok(ShardSpec::Auto { count: Some(8) }));
        let err = |s: &str| s.parse::<ShardSpec>().unwrap_err().to_string();
        assert_eq!(err("16/16"), "--shard 16/16: I must be below N (shards are numbered 0..15)");
        assert_eq!(err("1/0"), "--shard 1/0: N must be at least 1");
        assert_eq!(err("x/4"), "--shard x/4: I `x` is not a whole number");
        assert_eq!(err("3"), "--shard 3: expected I/N (e.g. 3/16), auto, or auto/N");
        assert_eq!(err("-1/4"), "--shard -1/4: I `-1` is not a whole number");
    }

    #[test]
    fn auto_reads_each_engine_and_names_the_missing_variable() {
        let auto = ShardSpec::Auto { count: None };
        let slurm = env_of(&[("SLURM_ARRAY_TASK_ID", "7"), ("SLURM_ARRAY_TASK_COUNT", "1000")]);
        assert_eq!(auto.resolve(&slurm), Ok((7, 1000)));
        let aws = env_of(&[("AWS_BATCH_JOB_ARRAY_INDEX", "2"), ("AWS_BATCH_JOB_ARRAY_SIZE", "5")]);
        assert_eq!(auto.resolve(&aws), Ok((2, 5)));
        let gcp = env_of(&[("BATCH_TASK_INDEX", "0"), ("BATCH_TASK_COUNT", "1")]);
        assert_eq!(auto.resolve(&gcp), Ok((0, 1)));
        let k8s = env_of(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(ShardSpec::Auto { count: Some(4) }.resolve(&k8s), Ok((3, 4)));

        let err = |spec: ShardSpec, env: &dyn Fn(&str) -> Option<String>| spec.resolve(env).unwrap_err().to_string();
        assert_eq!(
            err(auto, &k8s),
            "--shard auto: JOB_COMPLETION_INDEX is set but Kubernetes Indexed Jobs do not export a task count: \
             give the count as --shard auto/N"
        );
        assert_eq!(
            err(auto, &env_of(&[("SLURM_ARRAY_TASK_ID", "1")])),
            "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not set: give the count as --shard auto/N"
        );
        assert!(err(auto, &env_of(&[])).contains("none of SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX"));
        assert_eq!(
            err(auto, &env_of(&[("SLURM_ARRAY_TASK_ID", "x7"), ("SLURM_ARRAY_TASK_COUNT", "9")])),
            "--shard auto: SLURM_ARRAY_TASK_ID=`x7` is not a whole number"
        );
        assert_eq!(
            err(ShardSpec::Auto { count: Some(8) }, &slurm),
            "--shard auto: SLURM_ARRAY_TASK_COUNT=1000 but the command line says auto/8"
        );
        assert!(
            err(auto, &env_of(&[("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_COUNT", "4")]))
                .contains("--array=0-N-1")
        );
    }

    #[test]
    fn ranges_tile_the_listing_and_stay_put() {
        for (items, count) in [(0u64, 1u64), (9, 4), (10, 3), (4, 10), (10_000_000, 10_000), (u64::MAX / 2, 7)] {
            let mut next = 0;
            for i in 0..count {
                let (a, b) = range(i, count, items);
                assert_eq!(a, next, "{items} items, {count} shards: shard {i} starts where {} ended", i.max(1) - 1);
                assert!(b - a <= items / count + 1, "balanced to one item");
                next = b;
            }
            assert_eq!(next, items);
        }
        assert_eq!(range(1, 4, 9), (2, 4), "a pure function of (index, count, items): no coordinator");
    }
}
