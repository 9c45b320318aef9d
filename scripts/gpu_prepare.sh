#!/usr/bin/env bash
# Here, before a GPU loan: put what the GPU machine lacks into two git-ignored folders that the device call carries.
#   data/cifar10_jpeg.npz   the CIFAR-10 images (18 MB; the ../shared beside the checkout does not travel)
#   .whl/timm-*.whl         the timm this project is tested with (the GPU image has its own timm, of unknown version;
#                           its torch 2.11 + torchvision 0.26 were checked here with this timm: smoke suite and tests)
# Then one device call:  run(command="bash scripts/gpu_device_run.sh", carry=["data", ".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${TOKENPACE_SHARED:-../shared}
mkdir -p data .whl
cp -f "$SHARED/data/cifar10_jpeg.npz" data/
TIMM=$(python3 -c "import timm; print(timm.__version__)")
fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$fresh" "timm==$TIMM"  # the old wheel stays if offline
rm -f .whl/*.whl && mv "$fresh"/*.whl .whl/
{ git check-ignore -q data/cifar10_jpeg.npz && git check-ignore -q .whl/x.whl; } || {
  echo "data/ or .whl/ is not git-ignored" >&2; exit 1; }
ls .whl && du -ch data .whl | tail -1
