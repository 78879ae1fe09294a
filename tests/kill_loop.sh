#!/usr/bin/env bash
# The long kill -9 loop: a VGG16 extraction killed KILLS times (default 20)
# at reproducible moments, the cache verified after every kill, then a
# clean run checked against an uninterrupted one. CI runs the same test
# with 4 kills.
set -euo pipefail
cd "$(dirname "$0")/.."
CONVFLOW_KILLS="${1:-20}" cargo test --release --test crash kill_9 -- --nocapture
