//! The validated DAG: ids, edges, item kinds, topological order.
//!
//! Everything that can be known without running anything is checked here,
//! and all problems are reported together. No threads, no tokio.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, ConfigErrors, PipelineConfig, Pos, StageSpec};
use crate::facts::{Facts, StageRecord, Wants};
use crate::stage::{KindInfo, Registry, SharedConfig};

pub struct GraphStage {
    pub spec: StageSpec,
    pub info: KindInfo,
    pub config: SharedConfig,
    /// Indices of the stages feeding this one.
    pub inputs: Vec<usize>,
    /// Indices of the stages this one feeds.
    pub outputs: Vec<usize>,
    /// What arrives on its input (a source: nothing).
    pub input: Facts,
    /// What it emits.
    pub output: Facts,
}

impl GraphStage {
    pub fn id(&self) -> &str {
        &self.spec.id
    }
}

pub struct Graph {
    pub name: String,
    pub file: PathBuf,
    pub channel_capacity: usize,
    pub report: Option<PathBuf>,
    pub stages: Vec<GraphStage>,
    /// Stage indices, every stage after all of its inputs.
    pub order: Vec<usize>,
}

impl Graph {
    /// The graph, with every check: the file's and its environment's (input
    /// folders, models, weights: [`crate::stage::StageConfig::check_environment`]).
    pub fn build(cfg: PipelineConfig, registry: &Registry) -> Result<Graph, ConfigErrors> {
        Self::build_checked(cfg, registry, true)
    }

    /// `environment: false` checks the file alone, as `convflow validate
    /// --no-environment` does: a pipeline is correct before its inputs exist.
    pub fn build_checked(cfg: PipelineConfig, registry: &Registry, environment: bool) -> Result<Graph, ConfigErrors> {
        let file = cfg.file.clone();
        let mut errors = cfg.errors.clone();
        let mut err = |pos: Pos, stage: &str, field: Option<&str>, message: String| {
            errors.push(ConfigError {
                file: file.clone(),
                pos,
                stage: Some(stage.to_string()),
                field: field.map(str::to_string),
                message,
            })
        };

        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, s) in cfg.stages.iter().enumerate() {
            if let Some(&first) = index.get(s.id.as_str()) {
                err(
                    s.pos,
                    &s.id,
                    Some("id"),
                    format!("duplicate id (first used at line {})", cfg.stages[first].pos.line),
                );
            } else {
                index.insert(&s.id, i);
            }
        }

        // Kinds and typed options.
        let mut typed: Vec<Option<(KindInfo, SharedConfig)>> = Vec::new();
        for s in &cfg.stages {
            let Some(info) = registry.get(&s.kind) else {
                if !s.kind.is_empty() {
                    let known: Vec<&str> = registry.kinds().map(|k| k.kind).collect();
                    err(
                        s.kind_pos,
                        &s.id,
                        Some("kind"),
                        format!("unknown stage kind `{}`; known kinds: {}", s.kind, known.join(", ")),
                    );
                }
                typed.push(None);
                continue;
            };
            match info.parse(s.options.to_json()) {
                Ok(config) => {
                    let mut problems = config.check();
                    if environment {
                        problems.extend(config.check_environment());
                    }
                    for fe in problems {
                        err(field_pos(s, &fe.field), &s.id, Some(&fe.field), fe.message);
                    }
                    typed.push(Some((info.clone(), config)));
                }
                Err(e) => {
                    let field = if e.field == "." { None } else { Some(e.field.as_str()) };
                    let pos = match e.message.starts_with("unknown field") {
                        true => unknown_field_name(&e.message).and_then(|f| s.options.key_pos(f)).unwrap_or(s.pos),
                        false => field.map(|f| s.options.find(f).pos).unwrap_or(s.pos),
                    };
                    let field =
                        field.map(str::to_string).or_else(|| unknown_field_name(&e.message).map(str::to_string));
                    err(pos, &s.id, field.as_deref(), e.message.clone());
                    typed.push(None);
                }
            }
            if (s.workers > 1 || s.workers_auto) && !info.parallel {
                err(
                    s.pos,
                    &s.id,
                    Some("workers"),
                    format!("`{}` keeps state across items and runs as one worker", info.kind),
                );
            }
        }

        // Edges and their item kinds.
        let mut inputs: Vec<Vec<usize>> = vec![Vec::new(); cfg.stages.len()];
        for (i, s) in cfg.stages.iter().enumerate() {
            let is_source = typed[i].as_ref().map(|(info, _)| info.is_source());
            match is_source {
                Some(true) if !s.inputs.is_empty() => {
                    err(s.inputs[0].1, &s.id, Some("input"), "a source stage takes no input".into())
                }
                Some(false) if s.inputs.is_empty() => {
                    err(s.pos, &s.id, Some("input"), "this stage needs an `input`".into())
                }
                _ => {}
            }
            for (name, pos) in &s.inputs {
                let Some(&j) = index.get(name.as_str()) else {
                    err(
                        *pos,
                        &s.id,
                        Some("input"),
                        format!("unknown input `{name}`; stage ids are: {}", ids(&cfg.stages)),
                    );
                    continue;
                };
                inputs[i].push(j);
                if let (Some((up, _)), Some((down, _))) = (&typed[j], &typed[i]) {
                    match up.emits {
                        None => err(
                            *pos,
                            &s.id,
                            Some("input"),
                            format!("`{name}` ({}) is a sink and emits nothing", up.kind),
                        ),
                        Some(kind) if !down.accepts.contains(&kind) => err(
                            *pos,
                            &s.id,
                            Some("input"),
                            format!(
                                "`{name}` ({}) emits {} items but `{}` ({}) takes {}",
                                up.kind,
                                kind.name(),
                                s.id,
                                down.kind,
                                down.accepts.iter().map(|k| k.name()).collect::<Vec<_>>().join(" | ")
                            ),
                        ),
                        _ => {}
                    }
                }
            }
        }

        let order = match topological_order(&inputs) {
            Ok(order) => order,
            Err(cycle) => {
                let names: Vec<&str> = cycle.iter().map(|&i| cfg.stages[i].id.as_str()).collect();
                let first = &cfg.stages[cycle[0]];
                err(first.pos, &first.id, Some("input"), format!("cycle: {} -> {}", names.join(" -> "), names[0]));
                Vec::new()
            }
        };

        // What flows on each edge: options left out take what the stages
        // after them want, then each stage's facts follow from its input's.
        let mut edge_facts = None;
        if errors.is_empty() {
            let mut configs: Vec<SharedConfig> =
                typed.iter_mut().map(|t| t.as_ref().expect("no errors").1.clone()).collect();
            let wanted = wants_of_outputs(&configs, &inputs, &order, environment);
            for (config, wants) in configs.iter_mut().zip(&wanted) {
                if let Some(resolved) = config.resolve(wants) {
                    *config = resolved;
                }
            }
            let mut input_facts = vec![Facts::default(); cfg.stages.len()];
            let mut output_facts = vec![Facts::default(); cfg.stages.len()];
            for &i in &order {
                let s = &cfg.stages[i];
                let (info, _) = typed[i].as_ref().expect("no errors");
                let input = match merge(inputs[i].iter().map(|&j| (&cfg.stages[j].id, &output_facts[j]))) {
                    Ok(input) => input,
                    Err(message) => {
                        errors.push(error(&file, s.pos, &s.id, "inputs", message));
                        continue;
                    }
                };
                match configs[i].facts(&input, environment) {
                    Ok(mut out) => {
                        out.kind = info.emits;
                        if out.image_size != input.image_size {
                            out.image_size_by = Some(s.id.clone());
                        }
                        out.made_by.push(StageRecord {
                            id: s.id.clone(),
                            kind: info.kind.to_string(),
                            options: configs[i].canonical_json(),
                        });
                        output_facts[i] = out;
                    }
                    Err(problems) => {
                        for fe in problems {
                            errors.push(error(&file, field_pos(s, &fe.field), &s.id, &fe.field, fe.message));
                        }
                    }
                }
                input_facts[i] = input;
            }
            for (t, config) in typed.iter_mut().zip(configs) {
                if let Some((_, c)) = t {
                    *c = config;
                }
            }
            edge_facts = Some((input_facts, output_facts));
        }

        if !errors.is_empty() {
            errors.sort_by_key(|e| (e.pos.line, e.pos.col));
            return Err(ConfigErrors(errors));
        }

        let mut outputs: Vec<Vec<usize>> = vec![Vec::new(); cfg.stages.len()];
        for (i, ins) in inputs.iter().enumerate() {
            for &j in ins {
                outputs[j].push(i);
            }
        }
        let (input_facts, output_facts) = edge_facts.expect("no errors");
        let stages = cfg
            .stages
            .into_iter()
            .zip(typed)
            .zip(inputs.into_iter().zip(outputs))
            .zip(input_facts.into_iter().zip(output_facts))
            .map(|(((spec, t), (inputs, outputs)), (input, output))| {
                let (info, config) = t.expect("errors were returned above");
                GraphStage { spec, info, config, inputs, outputs, input, output }
            })
            .collect();
        Ok(Graph {
            name: cfg.name,
            file: cfg.file,
            channel_capacity: cfg.channel_capacity,
            report: cfg.report,
            stages,
            order,
        })
    }

    /// All stages upstream of `i`, nearest last, in topological order.
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.stages.len()];
        let mut stack = self.stages[i].inputs.clone();
        while let Some(j) = stack.pop() {
            if !seen[j] {
                seen[j] = true;
                stack.extend(&self.stages[j].inputs);
            }
        }
        self.order.iter().copied().filter(|&j| seen[j]).collect()
    }

    /// `convflow graph`'s text: each stage, then what flows on each of its
    /// output edges.
    pub fn facts_text(&self) -> String {
        let mut out = format!("{} ({})\n", self.name, self.file.display());
        for &i in &self.order {
            let s = &self.stages[i];
            let from = if s.inputs.is_empty() {
                String::new()
            } else {
                format!(" <- {}", s.inputs.iter().map(|&j| self.stages[j].id()).collect::<Vec<_>>().join(", "))
            };
            out.push_str(&format!("  {} ({}){from}\n", s.id(), s.info.kind));
            if s.info.emits.is_some() {
                out.push_str(&format!("      => {}\n", s.output.summary()));
            }
        }
        out
    }

    /// Graphviz DOT, edges labelled with what they carry.
    pub fn to_dot(&self) -> String {
        let mut out =
            format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n", self.name);
        for s in &self.stages {
            let workers = if s.spec.workers > 1 { format!("\\nworkers: {}", s.spec.workers) } else { String::new() };
            out.push_str(&format!("  \"{}\" [label=\"{}\\n({}){}\"];\n", s.id(), s.id(), s.info.kind, workers));
        }
        for s in &self.stages {
            for &j in &s.inputs {
                let up = &self.stages[j];
                let label = up.output.summary().replace('"', "\\\"").replace("; ", "\\n");
                out.push_str(&format!("  \"{}\" -> \"{}\" [label=\"{}\"];\n", up.id(), s.id(), label));
            }
        }
        out.push_str("}\n");
        out
    }
}

fn error(file: &Path, pos: Pos, stage: &str, field: &str, message: String) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        pos,
        stage: Some(stage.to_string()),
        field: Some(field.to_string()),
        message,
    }
}

/// Where a stage's field is written; a field inside a list (`layers[3]`)
/// points at its element.
fn field_pos(s: &StageSpec, field: &str) -> Pos {
    if field.contains('[') {
        Some(s.options.find(field).pos)
    } else {
        s.options.key_pos(field.split(['.', '[']).next().unwrap_or_default())
    }
    .unwrap_or(s.pos)
}

/// What the stages after each stage want of its output: what is wanted of
/// a stage's output passed up, with the stage's own wants of its input where
/// that says nothing (a head's image size reaches the `resize` before the
/// base, and outranks the named base's own default size: a trained model
/// requires, a base only prefers).
fn wants_of_outputs(configs: &[SharedConfig], inputs: &[Vec<usize>], order: &[usize], env: bool) -> Vec<Wants> {
    let mut wanted = vec![Wants::default(); configs.len()];
    for &i in order.iter().rev() {
        let own = wanted[i].clone().or(&configs[i].wants(env));
        for &j in &inputs[i] {
            wanted[j] = std::mem::take(&mut wanted[j]).or(&own);
        }
    }
    wanted
}

/// The facts arriving at a stage fed by several: the first input's, with
/// every input's splits; inputs that carry different things are an error.
fn merge<'a>(mut inputs: impl Iterator<Item = (&'a String, &'a Facts)>) -> Result<Facts, String> {
    let Some((first_id, first)) = inputs.next() else { return Ok(Facts::default()) };
    let mut merged = first.clone();
    for (id, other) in inputs {
        let same = other.kind == first.kind
            && other.image_size == first.image_size
            && other.channels == first.channels
            && other.features == first.features;
        if !same {
            return Err(format!(
                "its inputs carry different items: `{first_id}` {}; `{id}` {}",
                first.summary(),
                other.summary()
            ));
        }
        for split in &other.splits {
            if !merged.splits.contains(split) {
                merged.splits.push(split.clone());
            }
        }
        for record in &other.made_by {
            if !merged.made_by.contains(record) {
                merged.made_by.push(record.clone());
            }
        }
    }
    Ok(merged)
}

fn ids(stages: &[StageSpec]) -> String {
    stages.iter().map(|s| s.id.as_str()).collect::<Vec<_>>().join(", ")
}

/// serde's message is "unknown field `x`, expected ...".
fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Kahn's algorithm; on a cycle, returns one cycle's stages.
fn topological_order(inputs: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = inputs.len();
    let mut indegree: Vec<usize> = inputs.iter().map(Vec::len).collect();
    let mut outputs: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ins) in inputs.iter().enumerate() {
        for &j in ins {
            outputs[j].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).rev().collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &k in outputs[i].iter().rev() {
            indegree[k] -= 1;
            if indegree[k] == 0 {
                ready.push(k);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk backwards along inputs inside the unsorted rest until a node repeats.
    let mut node = (0..n).find(|&i| indegree[i] > 0).unwrap_or(0);
    let mut path = Vec::new();
    while !path.contains(&node) {
        path.push(node);
        node = inputs[node].iter().copied().find(|&j| indegree[j] > 0).unwrap_or(node);
    }
    let start = path.iter().position(|&x| x == node).unwrap_or(0);
    let mut cycle = path[start..].to_vec();
    cycle.reverse();
    // Start at the stage written first, so the message is stable.
    let first = cycle.iter().enumerate().min_by_key(|(_, s)| **s).map(|(i, _)| i).unwrap_or(0);
    cycle.rotate_left(first);
    Err(cycle)
}

#[cfg(test)]
mod tests {
    use super::topological_order;

    #[test]
    fn order_and_cycles() {
        assert_eq!(topological_order(&[vec![], vec![0], vec![1]]).unwrap(), vec![0, 1, 2]);
        let cycle = topological_order(&[vec![], vec![0, 2], vec![1]]).unwrap_err();
        assert_eq!(cycle.len(), 2);
    }
}
