//! A YAML tree that remembers where every node came from.
//!
//! serde_yaml drops positions once a document is parsed, but every config
//! error must point at `file:line:col`. So the document is read from
//! saphyr-parser's event stream into this small tree, `${param}`s are
//! substituted on it, and it is converted to JSON values for serde only at
//! the last step; errors found by serde are mapped back to a position with
//! [`Node::find`].

use std::collections::HashSet;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// 1-based line and column of a node in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar as written; `plain` is false for quoted scalars, which are
    /// always strings (YAML 1.2 core schema).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub struct ParseError {
    pub pos: Pos,
    pub message: String,
}

impl Node {
    pub fn scalar(text: impl Into<String>, plain: bool, pos: Pos) -> Node {
        Node { pos, value: Value::Scalar { text: text.into(), plain } }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value under `key` in a mapping, with the key node itself.
    pub fn get(&self, key: &str) -> Option<(&Node, &Node)> {
        self.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(k, v)| (k, v))
    }

    /// Walks a serde path (`a.b[2].c`, as serde_path_to_error prints it) and
    /// returns the deepest node reached; for a key that does not exist (an
    /// unknown field) it is the key node itself.
    pub fn find(&self, path: &str) -> &Node {
        let mut node = self;
        for segment in path_segments(path) {
            let next = match (&node.value, segment) {
                (Value::Map(entries), Segment::Key(k)) => {
                    entries.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, value)| value)
                }
                (Value::Seq(items), Segment::Index(i)) => items.get(i),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node
    }

    /// The position of the key `name` in this mapping, for unknown-field errors.
    pub fn key_pos(&self, name: &str) -> Option<Pos> {
        self.get(name).map(|(k, _)| k.pos)
    }

    /// Converts to a JSON value, resolving plain scalars as YAML 1.2's core
    /// schema does (null, booleans, integers, floats, else string).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Scalar { text, plain: false } => serde_json::Value::String(text.clone()),
            Value::Scalar { text, plain: true } => resolve_plain(text),
            Value::Seq(items) => serde_json::Value::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => serde_json::Value::Object(
                entries.iter().map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v.to_json())).collect(),
            ),
        }
    }
}

pub fn resolve_plain(text: &str) -> serde_json::Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return serde_json::Value::Null,
        "true" | "True" | "TRUE" => return serde_json::Value::Bool(true),
        "false" | "False" | "FALSE" => return serde_json::Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return serde_json::Value::from(i);
    }
    let looks_numeric = text.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
    if looks_numeric
        && let Ok(f) = text.parse::<f64>()
        && let Some(n) = serde_json::Number::from_f64(f)
    {
        return serde_json::Value::Number(n);
    }
    serde_json::Value::String(text.to_string())
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn path_segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        if part == "?" || part.is_empty() {
            continue;
        }
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

/// Parses one YAML document into a positioned tree. Anchors and aliases are
/// refused: pipelines are short and an alias would hide where a value came from.
pub fn parse(text: &str) -> Result<Node, ParseError> {
    let parser = Parser::new_from_str(text);
    let mut stack: Vec<Node> = Vec::new();
    // Pending key for each open mapping, parallel to `stack`.
    let mut keys: Vec<Option<Node>> = Vec::new();
    // The keys of each open mapping, for the duplicate check.
    let mut seen: Vec<HashSet<String>> = Vec::new();
    let mut root: Option<Node> = None;
    for event in parser {
        let (event, span) = event.map_err(|e| ParseError {
            pos: Pos { line: e.marker().line(), col: e.marker().col() + 1 },
            message: e.info().to_string(),
        })?;
        let pos = Pos { line: span.start.line(), col: span.start.col() + 1 };
        let finished = match event {
            Event::Scalar(text, style, _, _) => Some(Node::scalar(text.to_string(), style == ScalarStyle::Plain, pos)),
            Event::SequenceStart(..) => {
                stack.push(Node { pos, value: Value::Seq(Vec::new()) });
                keys.push(None);
                None
            }
            Event::MappingStart(..) => {
                stack.push(Node { pos, value: Value::Map(Vec::new()) });
                keys.push(None);
                seen.push(HashSet::new());
                None
            }
            Event::SequenceEnd => {
                keys.pop();
                stack.pop()
            }
            Event::MappingEnd => {
                keys.pop();
                seen.pop();
                stack.pop()
            }
            Event::Alias(_) => {
                return Err(ParseError { pos, message: "anchors and aliases are not supported".into() });
            }
            Event::DocumentStart(_) if root.is_some() => {
                return Err(ParseError { pos, message: "only one YAML document per file".into() });
            }
            _ => None,
        };
        if let Some(node) = finished {
            match stack.last_mut() {
                None => root = Some(node),
                Some(Node { value: Value::Seq(items), .. }) => items.push(node),
                Some(Node { value: Value::Map(entries), .. }) => {
                    let pending = keys.last_mut().expect("keys parallel to stack");
                    match pending.take() {
                        None => {
                            if node.as_str().is_none() {
                                return Err(ParseError {
                                    pos: node.pos,
                                    message: "mapping keys must be plain strings".into(),
                                });
                            }
                            // A set per open mapping: a map of many keys is checked in linear time.
                            let fresh = seen.last_mut().expect("a set per open mapping");
                            if !fresh.insert(node.as_str().unwrap_or_default().to_string()) {
                                return Err(ParseError {
                                    pos: node.pos,
                                    message: format!("duplicate key `{}`", node.as_str().unwrap_or_default()),
                                });
                            }
                            *pending = Some(node);
                        }
                        Some(key) => entries.push((key, node)),
                    }
                }
                Some(_) => unreachable!("only collections are pushed"),
            }
        }
    }
    Ok(root.unwrap_or(Node { pos: Pos { line: 1, col: 1 }, value: Value::Map(Vec::new()) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_types() {
        let doc = parse("a: 1\nb:\n  - x\n  - '2'\nc: {d: 2.5, e: true}\n").unwrap();
        assert_eq!(doc.get("b").unwrap().0.pos, Pos { line: 2, col: 1 });
        let json = doc.to_json();
        assert_eq!(json["a"], 1);
        assert_eq!(json["b"][1], "2");
        assert_eq!(json["c"]["d"], 2.5);
        assert_eq!(json["c"]["e"], true);
        assert_eq!(doc.find("b[1]").pos, Pos { line: 4, col: 5 });
        assert_eq!(doc.find("c.e").pos.line, 5);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.pos, Pos { line: 2, col: 1 });
    }
}
