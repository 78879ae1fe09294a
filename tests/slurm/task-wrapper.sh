#!/usr/bin/env bash
# Test-only stand-in for `convflow` in the array job (CONVFLOW=...): the
# first attempt of array task 1 is killed (SIGKILL) as soon as its shard
# has started (its staging folder exists) and the task requeued with
# `scontrol requeue`, so Slurm runs it again; every other run is plain.
set -euo pipefail
real="$CONVFLOW_REAL"
if [ "${SLURM_ARRAY_TASK_ID:-}" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ] && [ "${1:-}" = run ]; then
  "$real" "$@" &
  pid=$!
  until ls -d "$PLAN_DIR"/parts/.part-00001-* >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { echo "task-wrapper: shard 1 ended before it could be killed" >&2; exit 3; }
    sleep 0.01
  done
  # Dead mid-run, as on a lost node or an OOM kill, then requeued by Slurm.
  kill -KILL "$pid"
  echo "task-wrapper: shard 1 killed mid-run; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  sleep 60
else
  exec "$real" "$@"
fi
