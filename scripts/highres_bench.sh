#!/usr/bin/env bash
# The README's high-resolution table: ViT-B/16 at 224, 448, 640 and 1024 px and Swin-T at 448 and 640 px, batch 1,
# dense vs Evo and Idle at their defaults and at the configurations chosen for dense features (Evo with the
# representative token, which moves every placeholder; Idle at keep 0.8), interleaved, with GMACs; and SAM's ViT-B at
# 1024 px, dense vs Idle at 0.7 and 0.8.
# Usage: scripts/highres_bench.sh [OUT_DIR] [RUNS]
set -euo pipefail
OUT=${1:-bench_highres}
RUNS=${2:-5}
mkdir -p "$OUT"
for size in 224 448 640 1024; do
    tokenpace bench --model vit_base_patch16_224 --img-size "$size" --batch-size 1 --runs "$RUNS" --warmup 1 \
        --methods dense,evo,idle,evo:representative=true,idle@0.8 --json "$OUT/vit_base_${size}.json" --quiet
done
for size in 448 640; do
    tokenpace bench --model swin_tiny_patch4_window7_224 --img-size "$size" --batch-size 1 --runs "$RUNS" \
        --warmup 1 --methods dense,idle,idle@0.8 --json "$OUT/swin_tiny_${size}.json" --quiet
done
# SAM's ViT-B image encoder at its own 1024 px (64x64 tokens: 25 windows of 14x14, padded, and 4 global blocks)
tokenpace bench --model samvit_base_patch16 --batch-size 1 --runs "$RUNS" --warmup 1 \
    --methods dense,idle,idle@0.8 --json "$OUT/samvit_base_1024.json" --quiet
