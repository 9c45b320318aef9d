#!/usr/bin/env bash
# On the GPU machine (the device tool runs this in the checkout's copy, $OUT set): install the carried wheels beside
# the image's torch, record the machine, run the whole suite into $OUT. Prepared here by scripts/gpu_prepare.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?run this through the device tool, or set OUT to an output folder}
SITE=${TOKENPACE_SITE:-/tmp/site}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || exit 3
  export PYTHONPATH="$SITE"
fi
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
# Arguments go to the suite (--smoke: the CPU check of this script); its data: data/, as carried, by default.
# The suite keeps its own 400 s budget; timeout is the backstop should something hang past every deadline.
PYTHONUNBUFFERED=1 timeout -k 10 480 python3 scripts/gpu_suite.py "$@" "$OUT"
