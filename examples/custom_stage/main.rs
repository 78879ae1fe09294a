//! Your own convflow binary: the built-in stages plus yours, with the very
//! same CLI (`run`, `validate`, `graph`, `stages`, `cache`).
//!
//!   cargo run --release --example custom_stage -- stages
//!   cargo run --release --example custom_stage -- run my_pipeline.yaml

mod drop_uniform;

fn main() -> std::process::ExitCode {
    let mut registry = convflow::stages::builtin_registry();
    registry.register::<drop_uniform::DropUniformConfig>();
    convflow::cli::main(registry)
}
