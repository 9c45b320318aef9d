#!/usr/bin/env bash
# The README's ONNX Runtime CPU table: each model's dense export and its reduced exports, side by side in one run
# (every configuration exported once and checked against PyTorch, then its fp32 CPU session timed in interleaved
# rounds, median), for DeiT-S and a pyramid (Swin-T); random weights (speed does not depend on them).
# Usage: scripts/onnx_bench.sh [OUT_DIR] [RUNS] [THREADS]
#   SMOKE=1 scripts/onnx_bench.sh /tmp/onnx_smoke 1   the same commands on tiny models at 32 px (about a minute)
set -euo pipefail
OUT=${1:-bench_onnx}
RUNS=${2:-10}
THREADS=${3:-2}
mkdir -p "$OUT"
DEIT=(--model deit_small_patch16_224)
SWIN=(--model swin_tiny_patch4_window7_224)
BATCHES=1,32
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEIT=(--model deit_small_patch16_224 --model-args img_size=32,patch_size=4,depth=4)
    SWIN=(--model swin_tiny_patch4_window7_224 --model-args img_size=32,patch_size=2,window_size=4,depths=2/2,num_heads=2/4,embed_dim=32)
    BATCHES=1,4
fi
tokenpace bench --onnx "${DEIT[@]}" --methods dense,evo,idle,evit,topk --batch-size "$BATCHES" --runs "$RUNS" \
    --warmup 2 --threads "$THREADS" --json "$OUT/deit_small.json" --quiet
tokenpace bench --onnx "${SWIN[@]}" --methods dense,idle --batch-size "$BATCHES" --runs "$RUNS" \
    --warmup 2 --threads "$THREADS" --json "$OUT/swin_tiny.json" --quiet
