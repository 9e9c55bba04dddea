#!/usr/bin/env bash
# The GPU speed figures in one short prepared command (run from the repository root), written as JSON:
#   isdnet_bench/gpu_speed.sh [more isdnet-bench speed options]
# segment() end to end on an 88 x 320 x 320 volume (and 200 x 512 x 512) against the plain float32 batch-1 loop,
# and the isdnet / baseline training step ratio (128 x 128, batch 8, float32 and bf16), with the matmul peaks.
# About a minute on an H200 after the start-up; no dataset needed (the volumes are synthetic). OUT names the JSON
# file; DEVICE=cpu tries the script anywhere (add --quick for tiny sizes).
set -euo pipefail
OUT=${OUT:-bench-output/speed-gpu.json}
DEVICE=${DEVICE:-cuda}
. "$(dirname "$0")/gpu_env.sh"
mkdir -p "$(dirname "$OUT")"
"$PYTHON" -m isdnet_bench speed --device "$DEVICE" --only inference training --out "$OUT" "$@"
