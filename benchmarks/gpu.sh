#!/usr/bin/env bash
# The GPU checks in one go, from a checkout on a machine with an NVIDIA GPU and jax[cuda],
# flax, optax, orbax, torch and transformers installed:
#   1. tests/test_gpu.py: cuDNN attention as accurate as ours in bf16 (vision, logits, prefill);
#   2. benchmarks/generate.py on the GPU: ours (bf16; also without cuDNN attention, to show
#      what it gives; and with int8 / int4 packed weights, computed in bf16) against HF
#      transformers (bf16).
# Usage: bash benchmarks/gpu.sh [extra args for generate.py]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
$PY -m pytest -q -s -p no:cacheprovider tests/test_gpu.py
$PY benchmarks/generate.py --device gpu --rounds 1 --repeat 3 \
    --variants ours-bf16,ours-bf16+xlaattn,ours-int8,ours-int4,hf-bf16 "$@"
