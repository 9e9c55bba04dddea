#!/usr/bin/env bash
# The accuracy table on a CUDA GPU, several runs at once, in one prepared command (run from the repository root):
#   DATASET=path/to/hippocampus isdnet_bench/gpu_table.sh [more isdnet-bench accuracy options]
# On a machine that cannot download (the device tool's H200), copy the dataset into the repository (e.g. .data/)
# and put wheels of the packages its Python lacks (SimpleITK, jsonschema) in .whl/; both are then installed from
# there (gpu_env.sh). JOBS runs train at once (each with 2 CPU threads for its data); DEVICE=cpu tries the script
# anywhere.
set -euo pipefail
DATASET=${DATASET:-.data/hippocampus}
RESULTS=${RESULTS:-bench-output/accuracy-gpu}
JOBS=${JOBS:-8}
DEVICE=${DEVICE:-cuda}
. "$(dirname "$0")/gpu_env.sh"
"$PYTHON" -m isdnet_bench accuracy "$DATASET" --device "$DEVICE" --jobs "$JOBS" --threads 2 \
    --out "$RESULTS" --report "$RESULTS/results" "$@"
