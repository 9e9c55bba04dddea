#!/usr/bin/env bash
# The ranking benchmark (docs/active.md) on a CPU, one seed per core, resumable across sessions and machines:
#   isdnet_bench/cpu_active.sh            (from the repository root; DATASET=... for another copy of the data)
# Worker k of JOBS trains seeds k, k + JOBS, ... one thread each, so a seed's seven trainings (the start, five
# strategies, random) run in order. Each finished training leaves its small JSON record in
# docs/bench_active_hippocampus_runs/ (commit them, never the models); one cut off mid-training resumes from its
# checkpoint in $OUT when that folder is still there. When every worker is done, the report is rebuilt from all the
# records. To stop it, send SIGTERM to its whole process group (started with setsid: kill -TERM -- -PID).
set -euo pipefail
cd "$(dirname "$0")/.."
source isdnet_bench/seed_workers.sh
DATASET=${DATASET:-../shared/data/hippocampus}
PYTHON=${PYTHON:-.venv/bin/python}
RECORDS=${RECORDS:-docs/bench_active_hippocampus_runs}
OUT=${OUT:-bench-output/active-cpu}
REPORT=${REPORT:-docs/bench_active_hippocampus}
JOBS=${JOBS:-2}
SEEDS=(${SEEDS:-0 1 2 3 4})
# The training every round runs: isdnet with the engine's default loss (cross-entropy on), so that the ranking is
# measured on the models users train; the budget and the rest are isdnet-bench accuracy's protocol.
active() {
    nice -n 5 "$PYTHON" -m isdnet_bench active "$DATASET" --out "$OUT" --records "$RECORDS" --threads 1 \
        --cross-entropy 1 "$@"
}
each_seed active
active --seeds "${SEEDS[@]}" --report "$REPORT"
