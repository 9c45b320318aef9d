#!/usr/bin/env bash
# The README's VLM vision-tower rows: the encoders as the VLMs run them (the *_enc models: the towers' blocks, then
# the projector's or pooler's tokens for the language model) at their own sizes, batch 1: Qwen3.5's 88M and
# Qwen3-VL's 306M tower at 768 px (48 x 48 patches), DeepSeek-V4's at 546 px (39 x 39), Gemma 4's 167M and 570M at
# 768 px (48 x 48, pooled to 16 x 16 soft tokens); dense vs Evo and Idle at their defaults and Idle at keep 0.8,
# interleaved rounds, medians (fp32, random weights: speed does not depend on them).
# Usage: [MODELS="name ..."] scripts/vlm_towers_bench.sh [OUT_DIR] [RUNS] [BENCH_ARGS...]
set -euo pipefail
OUT=${1:-bench_vlm_towers}
RUNS=${2:-5}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$OUT"
MODELS=${MODELS:-qwen3_vit_88m_enc qwen3_vit_306m_enc deepseek_vit_412m_enc gemma4_vit_167m_enc gemma4_vit_570m_enc}
for model in $MODELS; do
    tokenpace bench --model "$model" --batch-size 1 --runs "$RUNS" --warmup 1 --methods dense,evo,idle,idle@0.8 \
        --json "$OUT/$model.json" --quiet "$@"
done
