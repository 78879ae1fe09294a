#!/bin/bash
# Plan, then queue the array job and its afterok merge. Usage:
#   PIPELINE=pipelines/extract_features.yaml PLAN_DIR=/shared/plan SHARDS=1000 \
#   CONVFLOW_SET="--set data_dir=/shared/photos --set out_dir=/shared/out" \
#   SHARED_CACHE=/shared/feature-cache deploy/slurm/submit.sh [extra sbatch options]
# Prints the two job ids. Every variable is passed on to the jobs (--export=ALL).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${PIPELINE:?}" "${PLAN_DIR:?}" "${SHARDS:?}"
export CONVFLOW_SET="${CONVFLOW_SET:-}"
mkdir -p logs
# Idempotent: a plan already there is kept, so resubmitting resumes.
if [ ! -f "$PLAN_DIR/plan.json" ]; then
  # shellcheck disable=SC2086
  "${CONVFLOW:-convflow}" plan "$PIPELINE" --shards "$SHARDS" --out "$PLAN_DIR" $CONVFLOW_SET
fi
parallel="${PARALLEL:-16}"
array=$(sbatch --parsable --export=ALL --array="0-$((SHARDS - 1))%$parallel" "$@" "$here/extract.sbatch")
merge=$(sbatch --parsable --export=ALL --dependency="afterok:${array%%;*}" "$here/merge.sbatch")
echo "array job $array, merge job $merge"
