#!/usr/bin/env bash
# The README's memory table: peak memory of one forward and one training step (forward, backward, AdamW), with and
# without gradient checkpointing, for dense and every method at its defaults; each configuration in its own process.
# Usage: scripts/memory_bench.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-bench_memory}
mkdir -p "$OUT"
for model in deit_small_patch16_224 vit_base_patch16_224; do
    for bs in 32 64; do
        tokenpace bench --model "$model" --memory --batch-size "$bs" --json "$OUT/${model}_b${bs}_inference.json" --quiet
        tokenpace bench --model "$model" --memory --train --batch-size "$bs" --json "$OUT/${model}_b${bs}_train.json" --quiet
        tokenpace bench --model "$model" --memory --train --grad-checkpointing --batch-size "$bs" \
            --json "$OUT/${model}_b${bs}_train_ckpt.json" --quiet
    done
done
