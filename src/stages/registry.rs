//! `kind:` name -> stage factory. Built-ins are registered exactly the way a
//! user's own stage is.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::item::ItemKind;
use crate::stage::{OptionDoc, SharedConfig, StageConfig};

/// Why a stage's options could not be read: a serde path and message.
#[derive(Debug, Clone)]
pub struct OptionsError {
    /// Dotted path inside the stage's options (`size[1]`), or the unknown field.
    pub field: String,
    pub message: String,
}

type ParseFn = fn(serde_json::Value) -> Result<SharedConfig, OptionsError>;

/// Everything the graph and the runtime need to know about one kind.
#[derive(Clone)]
pub struct KindInfo {
    pub kind: &'static str,
    pub summary: &'static str,
    pub accepts: &'static [ItemKind],
    pub emits: Option<ItemKind>,
    pub options: &'static [OptionDoc],
    pub parallel: bool,
    pub affects_pixels: bool,
    pub passes_precomputed: bool,
    pub random: bool,
    parse: ParseFn,
}

impl KindInfo {
    pub fn is_source(&self) -> bool {
        self.accepts.is_empty()
    }

    /// Typed options from their JSON form; unknown fields are errors.
    pub fn parse(&self, options: serde_json::Value) -> Result<SharedConfig, OptionsError> {
        (self.parse)(options)
    }
}

fn parse_config<C: StageConfig>(options: serde_json::Value) -> Result<SharedConfig, OptionsError> {
    serde_path_to_error::deserialize::<_, C>(options)
        .map(|c| Arc::new(c) as SharedConfig)
        .map_err(|e| OptionsError { field: e.path().to_string(), message: e.into_inner().to_string() })
}

#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, KindInfo>,
}

impl Registry {
    /// An empty registry; see [`crate::stages::builtin_registry`] for one with the built-ins.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `C::KIND`; a later registration of the same name replaces
    /// the earlier one, so a user can override a built-in.
    pub fn register<C: StageConfig>(&mut self) -> &mut Self {
        self.kinds.insert(
            C::KIND,
            KindInfo {
                kind: C::KIND,
                summary: C::SUMMARY,
                accepts: C::ACCEPTS,
                emits: C::EMITS,
                options: C::OPTIONS,
                parallel: C::PARALLEL,
                affects_pixels: C::AFFECTS_PIXELS,
                passes_precomputed: C::PASSES_PRECOMPUTED,
                random: C::RANDOM,
                parse: parse_config::<C>,
            },
        );
        self
    }

    pub fn get(&self, kind: &str) -> Option<&KindInfo> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &KindInfo> {
        self.kinds.values()
    }

    /// The text of `convflow stages`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for info in self.kinds() {
            let takes = if info.accepts.is_empty() {
                "source".to_string()
            } else {
                info.accepts.iter().map(|k| k.name()).collect::<Vec<_>>().join(" | ")
            };
            let emits = info.emits.map(|k| k.name()).unwrap_or("(sink)");
            out.push_str(&format!(
                "{}: {}\n  takes: {}  emits: {}{}\n",
                info.kind,
                info.summary,
                takes,
                emits,
                if info.parallel { "  (workers: N allowed)" } else { "" }
            ));
            for o in info.options {
                out.push_str(&format!("  {:<16} {:<22} default {:<24} {}\n", o.name, o.ty, o.default, o.help));
            }
            out.push('\n');
        }
        out.push_str(
            "Every stage also takes: id, kind, input (or inputs), workers, channel_capacity, on_error (skip | fail).\n",
        );
        out
    }
}
