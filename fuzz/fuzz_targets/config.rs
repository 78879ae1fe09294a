//! Pipeline YAML text -> `config::parse_str` -> `Graph::build` with the
//! built-in registry, and every error message and the DOT text formatted.
//! Nothing may panic, whatever the text.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn registry() -> &'static convflow::stages::Registry {
    static REGISTRY: OnceLock<convflow::stages::Registry> = OnceLock::new();
    REGISTRY.get_or_init(convflow::stages::builtin_registry)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // A `--set` override rides along when the text names a param `p`.
    let overrides = [("p".to_string(), "1".to_string())];
    let overrides = if text.contains("p:") { &overrides[..] } else { &[] };
    match convflow::config::parse_str(text, Path::new("fuzz.yaml"), overrides) {
        Ok(cfg) => match convflow::graph::Graph::build(cfg, registry()) {
            Ok(graph) => {
                let _ = graph.to_dot();
            }
            Err(errors) => {
                let _ = errors.to_string();
            }
        },
        Err(errors) => {
            let _ = errors.to_string();
        }
    }
});
