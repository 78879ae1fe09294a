#!/usr/bin/env bash
# Fuzzes the pipeline loader and the image decoder for a bounded time:
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 300 s; config decode)
#
# Installs cargo-fuzz if missing. Only stable Rust is needed: cargo-fuzz's
# nightly flags are accepted with RUSTC_BOOTSTRAP=1. Each target starts from
# the seed corpus in fuzz/corpus/<target>/seed-* (from tests/fixtures) plus
# whatever earlier runs added there (not in git); a crash is written to
# fuzz/artifacts/<target>/ and stops that target with a non-zero exit: fix
# it and copy the input to tests/fixtures/fuzz/<target>/, which the tests replay.
# Prints, per target, the seconds fuzzed and the executions done.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-300}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(config decode)
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

status=0
summary=()
for t in "${TARGETS[@]}"; do
    args=(-max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1)
    [ -f "fuzz/$t.dict" ] && args+=(-dict="fuzz/$t.dict")
    log="fuzz/artifacts/$t.log"
    mkdir -p "fuzz/artifacts/$t"
    set +e
    cargo fuzz run "$t" "fuzz/corpus/$t" -- "${args[@]}" 2>&1 | tee "$log" |
        grep -E '^(#[0-9]+[[:space:]]+DONE|==[0-9]+== ERROR|SUMMARY|thread .* panicked)'
    rc=${PIPESTATUS[0]}
    set -e
    # libFuzzer's own count: "Done N runs in S second(s)" (the build not included).
    done_line=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
    runs=$(echo "$done_line" | awk '{print $2}')
    secs=$(echo "$done_line" | awk '{print $5}')
    summary+=("$t: ${secs:-?} s, ${runs:-?} executions, exit $rc (log: $log)")
    [ "$rc" -eq 0 ] || status=1
done
printf '%s\n' "${summary[@]}"
exit $status
