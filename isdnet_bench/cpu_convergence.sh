#!/usr/bin/env bash
# Issue 16's time-to-accuracy benchmark (docs/convergence.md) over paired seeds on a CPU, one seed per core,
# resumable across sessions and machines:
#   isdnet_bench/cpu_convergence.sh            (from the repository root; DATASET=... for another copy of the data)
# Worker k of JOBS trains seeds k, k + JOBS, ... one thread each, the three arms of a seed in order (current,
# candidate, reference: about 15 + 11 + 41 minutes on one core); then the candidate of every seed again in bf16
# (the paired bf16 - float32 table that decides the CPU's training precision). Each finished run leaves its small JSON record in
# $RECORDS (commit them, never the models); one cut off mid-training resumes from its checkpoint in $OUT when that
# folder is still there. When every worker is done, the paired report is rebuilt from all the records. To stop it,
# send SIGTERM to its whole process group (started with setsid: kill -TERM -- -PID).
set -euo pipefail
cd "$(dirname "$0")/.."
source isdnet_bench/seed_workers.sh
DATASET=${DATASET:-../shared/data/hippocampus}
PYTHON=${PYTHON:-.venv/bin/python}
RECORDS=${RECORDS:-docs/bench_convergence_hippocampus_runs/ce_steps1200}
OUT=${OUT:-bench-output/convergence-cpu}
REPORT=${REPORT:-docs/bench_convergence_hippocampus_ce}
JOBS=${JOBS:-2}
SEEDS=(${SEEDS:-0 1 2 3 4})
# The candidate plans 1200 steps: with 3000, patience ended it before poly had decayed (docs/convergence.md).
convergence() {
    nice -n 5 "$PYTHON" -m isdnet_bench convergence "$DATASET" --out "$OUT" --records "$RECORDS" --threads 1 \
        --steps 1200 "$@"
}
bf16_candidate() {
    convergence --arms candidate --precision bf16 "$@"
}
each_seed convergence
each_seed bf16_candidate
convergence --seeds "${SEEDS[@]}" --precision fp32 bf16 --report "$REPORT" --report-only
