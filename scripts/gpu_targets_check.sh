#!/usr/bin/env bash
# A short follow-up loan (~4 min): the DeiT-S target groups again with cuDNN autotuning (tokenpace bench sets it
# on CUDA since the second H200 run's kernel profile), the eager kernel profile with it, and the batch-256
# compiled groups: reduce-overhead (the suite's budget cut it in that run) and default.
#   run(command="bash scripts/gpu_targets_check.sh", carry=[".whl"], timeout_s=330)   # after gpu_prepare.sh
# (the steps' own limits add up to 310 s, in order of what matters most; 2b took 157 s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?run this through the device tool, or set OUT to an output folder}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="src:/tmp/site" PYTHONUNBUFFERED=1
bench() { local limit=$1; shift; timeout "$limit" python3 -m tokenpace.cli bench --model deit_small_patch16_224 --device cuda --amp bf16 "$@"; }
{
  bench 45 --batch-size 256,1 --methods dense,evo,idle,evit,topk --json "$OUT/eager.json"
  bench 45 --batch-size 256,1 --cuda-graph --methods dense,evo,idle,evit,topk --json "$OUT/cuda_graph.json"
  timeout 40 python3 scripts/gpu_kernel_profile.py --cudnn-benchmark --compiled "" "$OUT"
  bench 90 --batch-size 256 --compile --compile-mode reduce-overhead --methods dense,evo,idle \
    --json "$OUT/compiled_reduce_overhead.json"
  bench 90 --batch-size 256 --compile --methods dense,evo,idle --json "$OUT/compiled.json"
} 2>&1 | grep -v "^USDT\|^ERROR:.*DeviceProperties\|UserWarning\|warnings.warn\|_warn_once" | tee "$OUT/check.log"
