//! `params:` with `${name}` substitution and `--set name=value` overrides.
//! A whole scalar `${a + b}` is the sum of integer params (or integers):
//! a run's epochs made of two phases' (`fine_tune.yaml`).

use std::collections::HashMap;

use super::yaml::{Node, Pos, Value};

/// The file's params with overrides applied, in file order. A param's value
/// is kept as a node so that `${n}` alone in a scalar keeps its YAML type.
pub fn collect(
    root: &Node,
    overrides: &[(String, String)],
    error: &mut dyn FnMut(Pos, Option<&str>, String),
) -> Vec<(String, Node)> {
    let mut params: Vec<(String, Node)> = Vec::new();
    let params_pos = root.get("params").map(|(k, _)| k.pos).unwrap_or(Pos { line: 1, col: 1 });
    if let Some((_, node)) = root.get("params") {
        match node.as_map() {
            Some(entries) => {
                for (k, v) in entries {
                    let name = k.as_str().unwrap_or_default().to_string();
                    if v.as_str().is_none() {
                        error(v.pos, Some(&name), "a param's value must be a scalar".into());
                        continue;
                    }
                    // Params are not substituted inside `params:`; taken
                    // literally, `${x}` would reach a stage as those characters.
                    // (Kept, so its uses are not also named as unknown.)
                    if v.as_str().is_some_and(|t| t.replace("$${", "").contains("${")) {
                        error(
                            v.pos,
                            Some(&name),
                            "`${…}` inside `params:` is not substituted: write the value itself (or `$${` for a \
                             literal `${`)"
                                .into(),
                        );
                    }
                    params.push((name, v.clone()));
                }
            }
            None => error(node.pos, Some("params"), "expected a mapping of name: value".into()),
        }
    }
    for (name, value) in overrides {
        match params.iter_mut().find(|(n, _)| n == name) {
            Some((_, node)) => *node = Node::scalar(value.clone(), true, node.pos),
            None => {
                let known: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
                error(
                    params_pos,
                    Some(name),
                    format!(
                        "--set {name}: no such param (params: {})",
                        if known.is_empty() { "none".into() } else { known.join(", ") }
                    ),
                );
            }
        }
    }
    params
}

/// Replaces `${name}` in every scalar outside `params:`. `$${` is a literal `${`.
pub fn substitute(root: &mut Node, params: &[(String, Node)], error: &mut dyn FnMut(Pos, String)) {
    // One index, so a file of many params and uses is parsed in linear time.
    let index: HashMap<&str, &Node> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    if let Value::Map(entries) = &mut root.value {
        for (k, v) in entries.iter_mut() {
            if k.as_str() != Some("params") {
                walk(v, params, &index, error);
            }
        }
    }
}

fn walk(node: &mut Node, params: &[(String, Node)], index: &HashMap<&str, &Node>, error: &mut dyn FnMut(Pos, String)) {
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|n| walk(n, params, index, error)),
        Value::Map(entries) => entries.iter_mut().for_each(|(_, v)| walk(v, params, index, error)),
        Value::Scalar { text, .. } if text.contains("${") => {
            let lookup = |name: &str| index.get(name).copied();
            // A whole-scalar reference keeps the param's type (numbers stay
            // numbers); a whole-scalar sum is a number.
            if let Some(name) = text.strip_prefix("${").and_then(|t| t.strip_suffix('}'))
                && !name.contains(['$', '{', '}'])
            {
                if name.contains('+') {
                    match sum(name, &lookup) {
                        Ok(total) => node.value = Value::Scalar { text: total.to_string(), plain: true },
                        Err(e) => error(node.pos, e),
                    }
                    return;
                }
                match lookup(name) {
                    Some(v) => node.value = v.value.clone(),
                    None => error(node.pos, unknown(name, params)),
                }
                return;
            }
            let mut out = String::new();
            let mut rest = text.as_str();
            while let Some(i) = rest.find('$') {
                out.push_str(&rest[..i]);
                let tail = &rest[i..];
                if let Some(t) = tail.strip_prefix("$${") {
                    out.push_str("${");
                    rest = t;
                } else if let Some(t) = tail.strip_prefix("${") {
                    match t.find('}') {
                        Some(end) => {
                            let name = &t[..end];
                            match lookup(name) {
                                Some(v) => out.push_str(v.as_str().unwrap_or_default()),
                                None => error(node.pos, unknown(name, params)),
                            }
                            rest = &t[end + 1..];
                        }
                        None => {
                            error(node.pos, "unclosed `${`".into());
                            return;
                        }
                    }
                } else {
                    out.push('$');
                    rest = &tail[1..];
                }
            }
            out.push_str(rest);
            node.value = Value::Scalar { text: out, plain: false };
        }
        Value::Scalar { .. } => {}
    }
}

/// `a + b + 3`: each term an integer param or an integer.
fn sum<'a>(expr: &str, lookup: &dyn Fn(&str) -> Option<&'a Node>) -> Result<i64, String> {
    let mut total = 0i64;
    for term in expr.split('+').map(str::trim) {
        let n = match term.parse::<i64>() {
            Ok(n) => n,
            Err(_) => {
                let text = lookup(term)
                    .ok_or_else(|| format!("`${{{expr}}}`: unknown param `{term}`"))?
                    .as_str()
                    .unwrap_or_default();
                text.trim().parse::<i64>().map_err(|_| {
                    format!("`${{{expr}}}`: `{term}` is `{text}`, not an integer (a sum adds integers only)")
                })?
            }
        };
        total = total.checked_add(n).ok_or_else(|| format!("`${{{expr}}}` overflows"))?;
    }
    Ok(total)
}

fn unknown(name: &str, params: &[(String, Node)]) -> String {
    let known: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    format!("unknown param `${{{name}}}` (params: {})", if known.is_empty() { "none".into() } else { known.join(", ") })
}

#[cfg(test)]
mod tests {
    use super::super::yaml::parse;
    use super::*;

    fn run(src: &str, overrides: &[(String, String)]) -> (serde_json::Value, Vec<String>) {
        let mut root = parse(src).unwrap();
        let mut errs = Vec::new();
        let params = collect(&root, overrides, &mut |_, _, m| errs.push(m));
        substitute(&mut root, &params, &mut |_, m| errs.push(m));
        (root.to_json(), errs)
    }

    #[test]
    fn whole_and_embedded_references() {
        let (j, errs) = run("params: {n: 20, dir: out}\na: ${n}\nb: ${dir}/x\nc: $${dir}\n", &[]);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(j["a"], 20);
        assert_eq!(j["b"], "out/x");
        assert_eq!(j["c"], "${dir}");
    }

    #[test]
    fn a_sum_adds_integer_params_and_refuses_anything_else() {
        let (j, errs) = run("params: {a: 30, b: 100}\ne: ${a + b}\nf: ${ a+b+2 }\n", &[("b".into(), "20".into())]);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(j["e"], 50);
        assert_eq!(j["f"], 52);
        let (_, errs) = run("params: {a: 30, d: out}\ne: ${a + d}\nf: ${a + z}\n", &[]);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("`d` is `out`, not an integer"), "{errs:?}");
        assert!(errs[1].contains("unknown param `z`"), "{errs:?}");
    }

    #[test]
    fn overrides_and_unknowns() {
        let (j, errs) =
            run("params: {n: 20}\na: ${n}\nb: ${m}\n", &[("n".into(), "7".into()), ("zz".into(), "1".into())]);
        assert_eq!(j["a"], 7);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("--set zz")));
        assert!(errs.iter().any(|e| e.contains("${m}")));
    }
}
