#!/usr/bin/env bash
# The README's CIFAR-10 table: train dense and Evo from scratch, fine-tune Idle (with and without the cut loss) and
# EViT from the dense weights, then evaluate every row, including the random-score controls.
# Usage: scripts/cifar10_results.sh [RUNS_DIR] [EPOCHS] [FINETUNE_EPOCHS]   (data: $TOKENPACE_DATA or ../shared/data)
set -euo pipefail
RUNS=${1:-runs/cifar10}
EPOCHS=${2:-6}
FT_EPOCHS=${3:-1}
DATA=${TOKENPACE_DATA:-../shared/data}/cifar10_jpeg.npz
MODEL="--model vit_tiny_patch16_224 --model-args img_size=32,patch_size=4,depth=6,embed_dim=128,num_heads=4"
COMMON="$MODEL --batch-size 128 --workers 1 --quiet"
mkdir -p "$RUNS"

tokenpace train --recipe dense --data "$DATA" --output "$RUNS/dense" $COMMON --epochs "$EPOCHS" --warmup-epochs 1 --lr 1e-3
tokenpace train --recipe evo-scratch --data "$DATA" --output "$RUNS/evo" $COMMON --epochs "$EPOCHS" --warmup-epochs 1 --lr 1e-3
INIT="$RUNS/dense/model.safetensors"
tokenpace train --recipe idle-finetune --data "$DATA" --output "$RUNS/idle_cut" $COMMON --checkpoint "$INIT" --epochs "$FT_EPOCHS" --lr 1e-4
tokenpace train --recipe idle-finetune --cut-mode none --data "$DATA" --output "$RUNS/idle_nocut" $COMMON --checkpoint "$INIT" --epochs "$FT_EPOCHS" --lr 1e-4
# the teacher's share: the same fine-tune without distillation (no teacher is run), then without the cut loss too
tokenpace train --recipe idle-finetune --distill-weight 0 --data "$DATA" --output "$RUNS/idle_noteacher" $COMMON --checkpoint "$INIT" --epochs "$FT_EPOCHS" --lr 1e-4
tokenpace train --recipe idle-finetune --distill-weight 0 --cut-mode none --data "$DATA" --output "$RUNS/idle_ce" $COMMON --checkpoint "$INIT" --epochs "$FT_EPOCHS" --lr 1e-4
tokenpace train --recipe finetune --data "$DATA" --output "$RUNS/evit" $COMMON --checkpoint "$INIT" --epochs "$FT_EPOCHS" --lr 1e-4

EVAL="--data $DATA --batch-size 128 --workers 1 --quiet"
tokenpace eval --run "$RUNS/dense" $EVAL --json "$RUNS/eval_dense.json" \
    --methods dense,evo,idle,evit,topk,evo:score=random,idle:score=random,evit:score=random,topk:score=random
tokenpace eval --run "$RUNS/evo" $EVAL --json "$RUNS/eval_evo.json" --methods dense,evo,evo:score=random
tokenpace eval --run "$RUNS/idle_cut" $EVAL --json "$RUNS/eval_idle_cut.json" --methods dense,idle,idle:score=random
tokenpace eval --run "$RUNS/idle_nocut" $EVAL --json "$RUNS/eval_idle_nocut.json" --methods dense,idle,idle:score=random
tokenpace eval --run "$RUNS/idle_noteacher" $EVAL --json "$RUNS/eval_idle_noteacher.json" --methods dense,idle,idle:score=random
tokenpace eval --run "$RUNS/idle_ce" $EVAL --json "$RUNS/eval_idle_ce.json" --methods dense,idle,idle:score=random
tokenpace eval --run "$RUNS/evit" $EVAL --json "$RUNS/eval_evit.json" --methods dense,evit,evit:score=random
tokenpace eval --run "$RUNS/dense" $EVAL --methods evo,idle,evit,topk --keep-sweep 0.3:1.0:0.1 --plot "$RUNS/sweep_dense.png" \
    --json "$RUNS/sweep_dense.json"

# Cluttered variant: each image at a random fixed position on a 64 px noise canvas, patch 8 (64 tokens, a quarter
# of them on the object); trained densely, then every method applied without fine-tuning, with random controls.
tokenpace train --recipe dense --data "$DATA" --canvas 64 --output "$RUNS/clutter_dense" --batch-size 128 --workers 1 \
    --quiet --model vit_tiny_patch16_224 --model-args img_size=64,patch_size=8,depth=6,embed_dim=128,num_heads=4 \
    --epochs 4 --warmup-epochs 1 --lr 1e-3
tokenpace eval --run "$RUNS/clutter_dense" $EVAL --canvas 64 --json "$RUNS/eval_clutter.json" \
    --methods dense,evo,idle,evit,topk,evo:score=random,idle:score=random,evit:score=random,topk:score=random
