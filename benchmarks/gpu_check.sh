#!/usr/bin/env bash
# The GPU checks, for a session lent a device machine (CUDA): the CUDA tests, then the GPU benchmark
# rows, in under 8 minutes. Everything else builds and passes its tests without a GPU (make test).
#
# Here (once per session, PyPI reachable):   make gpu-wheels        # .whl/: what the device image lacks
# There (the device tool, from the repo root): command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540
#
# The device image brings its own python3 with a CUDA build of torch / torchvision (not the pinned
# pair of constraints.txt: nothing can be installed from an index there), timm, typer, rich,
# safetensors, scipy and onnx; .whl/ adds pycocotools and the two offline ImageNet weight wheels.
# Logs and JSON go to $OUT (the device tool brings them back), else to /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
python3 - <<'PY' 2>&1 | tee "$OUT/device.txt" || { echo "gpu_check: no CUDA device here; nothing to check"; exit 2; }
import torch, torchvision
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.cuda.get_device_name()}")
PY
status=0
# 1. The CUDA tests (skipped on machines without CUDA) and the device decisions (mocked torch.cuda).
timeout 240 python3 -m pytest tests/test_survive.py tests/test_device.py -q -p no:cacheprovider -k "cuda or device" \
  2>&1 | tee "$OUT/cuda-tests.log" || status=1
# 2. GPU benchmark rows: train / distill throughput and peak memory on one GPU, fp32 and bf16 autocast.
#    (run folders under /tmp, only the JSON record comes back)
timeout 240 python3 benchmarks/scale.py --device cuda --procs 1 --amp off,bf16 --images 256 --size 320 --batch 32 \
  --out /tmp/gpu_check_runs/scale-cuda 2>&1 | tee "$OUT/scale-cuda.log" || status=1
cp /tmp/gpu_check_runs/scale-cuda.json "$OUT/" 2>/dev/null || status=1
echo "gpu_check: exit $status (logs and JSON in $OUT)"
exit $status
