#!/usr/bin/env bash
# The README's LeViT / Swin / PVTv2 CPU table: dense and the family's method at its default keep and lower keeps,
# batch 32, fp32, interleaved rounds (random weights: speed does not depend on them). The table predates the
# per-model defaults of tokenpace/defaults.py, so its settings are pinned here: LeViT's Evo from block 2 (today: 1),
# PVTv2's Idle stages from block 4 (today: keep 0.4 from block 2; these rows located that default).
# Usage: scripts/pyramid_bench.sh [OUT_DIR] [RUNS]
set -euo pipefail
OUT=${1:-bench_pyramid}
RUNS=${2:-9}
mkdir -p "$OUT"
tokenpace bench --model levit_256 --methods dense,evo:keep=0.7:stage_starts=2,evo:keep=0.6:stage_starts=2,evo:keep=0.5:stage_starts=2,evo:keep=0.4:stage_starts=2,evo:keep=0.3:stage_starts=2 \
    --runs "$RUNS" --json "$OUT/levit_256.json" --quiet
tokenpace bench --model levit_256 --fuse-bn --methods dense,evo:keep=0.5:stage_starts=2 --runs "$RUNS" --json "$OUT/levit_256_fused.json" --quiet
tokenpace bench --model swin_tiny_patch4_window7_224 --methods dense,idle@0.9,idle@0.8,idle,idle@0.5,idle:score=norm \
    --runs "$RUNS" --json "$OUT/swin_tiny.json" --quiet
tokenpace bench --model pvt_v2_b2 --methods dense,idle:keep=0.7:stage_starts=4/8/12,idle:keep=0.5:stage_starts=4/8/12,idle:keep=0.4:stage_starts=4/8/12,idle:keep=0.3:stage_starts=4/8/12 \
    --runs "$RUNS" --json "$OUT/pvt_v2_b2.json" --quiet
