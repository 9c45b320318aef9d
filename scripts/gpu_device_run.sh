#!/usr/bin/env bash
# On the GPU machine (the device tool runs this in the checkout's copy, $OUT set): install the carried wheels beside
# the image's torch, check every import the suite needs, record the machine, run the whole suite into $OUT.
# Prepared here by scripts/gpu_prepare.sh. PYTHON, TOKENPACE_WHEELS and TOKENPACE_SITE exist for the CPU test.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?run this through the device tool, or set OUT to an output folder}
PYTHON=${PYTHON:-python3}
WHEELS=${TOKENPACE_WHEELS:-.whl}
SITE=${TOKENPACE_SITE:-/tmp/site}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else  # the loan is one chance: run on the image's own timm rather than not at all, and say so
    echo "WARNING: the carried wheels did not install; running on the machine's own timm" >&2
  fi
fi
# every import of the one-shot run, now rather than minutes into it; pyplot builds its font cache here, before the
# suite's clock starts
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg "$PYTHON" -c "
import numpy, PIL, matplotlib.pyplot, safetensors, torch, timm, tokenpace
print('torch', torch.__version__, 'timm', timm.__version__, 'from', timm.__file__, 'cuda', torch.cuda.is_available())
" || exit 4
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
# Arguments go to the suite (--smoke: the CPU check of this script); its data: data/, as carried, by default.
# The suite keeps its own 410 s budget (alarms by 420 s); timeout is the backstop should something hang past them all.
PYTHONUNBUFFERED=1 timeout -k 10 480 "$PYTHON" scripts/gpu_suite.py "$@" "$OUT"
