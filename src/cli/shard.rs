//! The `plan`, `run --shard` and `merge` commands.

use std::path::Path;
use std::process::ExitCode;

use super::exit;
use crate::graph::Graph;
use crate::shard::ShardSpec;
use crate::shard::part::{self, Prepared};
use crate::shard::plan::{self, Plan};

pub fn plan(graph: &Graph, shards: u64, out: &Path, quiet: bool) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let plan = plan::make(graph, out, shards)?;
    if !quiet {
        println!(
            "{}: {} items for {} shards ({:.2} s); fingerprint {}",
            out.join(plan::PLAN).display(),
            plan.items,
            plan.shards,
            started.elapsed().as_secs_f64(),
            plan::short(&plan.fingerprint)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs shard `spec` of the plan in `plan_dir` through `run` (the ordinary
/// run, report and signals included) and publishes its part.
pub fn run_shard(
    mut graph: Graph,
    spec: ShardSpec,
    plan_dir: &Path,
    quiet: bool,
    run: impl FnOnce(&Graph, crate::stage::ShardRun) -> anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    let (index, count) = match spec.resolve(&|v| std::env::var(v).ok()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(exit::INVALID));
        }
    };
    let started = std::time::Instant::now();
    let plan = Plan::load(plan_dir)?;
    let staging = match part::prepare(&mut graph, &plan, plan_dir, index, count)? {
        Prepared::Done(dir) => {
            if !quiet {
                println!("shard {index}/{count}: already published in {}; nothing to do", dir.display());
            }
            return Ok(ExitCode::SUCCESS);
        }
        Prepared::Run(staging) => staging,
    };
    let prepared = started.elapsed();
    let code = run(&graph, staging.shard_run()?)?;
    if code != ExitCode::SUCCESS {
        // The staging folder goes with `staging`: nothing half-done is published.
        return Ok(code);
    }
    let ran = started.elapsed();
    let dir = staging.publish()?;
    if !quiet {
        println!(
            "shard {index}/{count}: published {} (plan and range {:.3} s, run {:.3} s, publish {:.3} s)",
            dir.display(),
            prepared.as_secs_f64(),
            (ran - prepared).as_secs_f64(),
            (started.elapsed() - ran).as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn merge(graph: &Graph, plan_dir: &Path, report: Option<&Path>, quiet: bool) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let plan = Plan::load(plan_dir)?;
    let summary = crate::shard::merge::merge(graph, &plan, plan_dir, report)?;
    if !quiet {
        println!("{} ({:.2} s)", crate::shard::merge::describe(&summary), started.elapsed().as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}
