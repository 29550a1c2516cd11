#!/usr/bin/env bash
# The CUDA checks in one command: the oracle tests marked `gpu` (every CUDA backend, fp32 and bf16, padded and
# unpadded, lengths around multiples of 8/16/32, head dims up to 512, sliding windows; the real gemma-3-270m
# test needs its zoo download), then the benchmark on CUDA. Fails at once without a visible GPU. Extra
# arguments go to pytest (e.g. -k kernels, -m "gpu and not slow").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
py=.venv/bin/python
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu-check: torch sees no CUDA device")'
"$py" -c 'import torch; print("gpu-check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
"$py" -m pytest -m gpu -rs "$@" tests/engine/test_gpu.py
"$py" -m extract.cli bench --device cuda --lengths 512 2048 4096 --repeats 5
