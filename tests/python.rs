//! The Python package (python/): its pytest suite, python/tests/, run on
//! the wheel built from this checkout. python/tests/setup.sh builds and
//! installs it into python/.venv (tests/setup.sh runs it first; here again,
//! a no-op unless a source changed, so the wheel is never stale).

mod common;

use std::process::Command;

#[test]
fn python_package_pytest_suite_passes() {
    let root = common::root();
    let setup = Command::new(root.join("python/tests/setup.sh")).status().expect("running python/tests/setup.sh");
    assert!(setup.success(), "python/tests/setup.sh failed (it builds the wheel into python/.venv)");
    let status = Command::new(root.join("python/.venv/bin/python"))
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "python/tests"])
        .env("CONVFLOW_BIN", env!("CARGO_BIN_EXE_convflow"))
        .current_dir(&root)
        .status()
        .expect("running pytest");
    assert!(status.success(), "pytest python/tests failed (its output is above)");
}
