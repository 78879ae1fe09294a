//! The `convflow` binary: the CLI over the built-in stages.

fn main() -> std::process::ExitCode {
    convflow::cli::main(convflow::stages::builtin_registry())
}
