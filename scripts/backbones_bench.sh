#!/usr/bin/env bash
# The README's speed rows for every family at its defaults (CPU, batch 32, fp32, random weights: speed does not
# depend on them): dense and each method the family runs, interleaved rounds, medians.
# Usage: scripts/backbones_bench.sh [OUT_DIR] [RUNS] [BENCH_ARGS...]   (e.g. --malloc keep; passed to every run)
set -euo pipefail
OUT=${1:-bench_backbones}
RUNS=${2:-5}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$OUT"
for model in deit_small_patch16_224 eva02_small_patch14_224 vit_base_patch16_siglip_224 vit_small_patch16_dinov3 \
             beitv2_base_patch16_224 swinv2_tiny_window8_256 swinv2_cr_tiny_ns_224 vit_relpos_medium_patch16_224 \
             naflexvit_base_patch16_siglip vit_dwee_patch16_reg1_gap_256 vit_pwee_patch16_reg1_gap_256 \
             vit_dpwee_patch16_reg1_gap_256 cait_xxs24_224 levit_conv_256 \
             levit_256 pit_s_224 swin_tiny_patch4_window7_224 pvt_v2_b2 hiera_tiny_224 tiny_vit_21m_224 \
             maxvit_tiny_tf_224 coatnet_0_rw_224 xcit_small_12_p16_224 volo_d1_224 davit_tiny; do
    tokenpace bench --model "$model" --batch-size 32 --runs "$RUNS" --warmup 1 --json "$OUT/$model.json" --quiet "$@"
done
