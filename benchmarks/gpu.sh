#!/usr/bin/env bash
# The GPU checks in one go, from a checkout on a machine with an NVIDIA GPU and jax[cuda],
# flax, optax, orbax, torch and transformers installed. Everything printed also goes to
# $OUT/gpu.log (OUT defaults to /tmp/qwen2vl-gpu), and the decode profile's trace (perfetto JSON)
# to $OUT/decode_trace.json.gz.
#   accuracy  tests/test_gpu.py: cuDNN attention as accurate as ours in bf16 (vision, logits,
#             prefill);
#   levers    benchmarks/limits.py on 2B bf16: decode at batch 1 and 64 with each lever (plain,
#             fused projections, 4 steps per loop iteration, both), and a per-kernel profile
#             of the plain decode loop;
#   limits    benchmarks/limits.py on 2B and 7B in bf16 and int4: params on device, batch-1
#             decode, first token, batch-64 decode and the vision tower at 1344x1344, each
#             beside its ceiling measured in the same run (copy bandwidth, matmul peak);
#   versus    benchmarks/generate.py: ours (bf16, without cuDNN attention, int8, int4) against
#             HF transformers (bf16) on the same shapes.
# Usage: bash benchmarks/gpu.sh [accuracy] [levers] [limits] [versus]   (default: all four;
# each part is a few minutes, so a machine with a per-command limit takes them in two or three
# calls; run benchmarks/generate.py or limits.py directly for other arguments)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/qwen2vl-gpu}
mkdir -p "$OUT"
traces=$(mktemp -d)  # this run's profile only (its folders nest too deep to come back from $OUT)
parts=${*:-accuracy levers limits versus}
status=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  for part in $parts; do
    echo "== $part ($(date +%T))"
    case $part in
      accuracy) $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py || status=1 ;;
      levers)
        $PY benchmarks/limits.py --sizes 2b --weights float --parts decode,batch \
            --levers plain,fused,steps4,fused+steps4 --profile "$traces" || status=1
        trace=$(find "$traces" -name perfetto_trace.json.gz | sort | tail -1)
        [ -n "$trace" ] && cp "$trace" "$OUT/decode_trace.json.gz" ;;
      limits)
        $PY benchmarks/limits.py --sizes 2b,7b --weights float,int4 --parts decode,ttft,batch,vit || status=1 ;;
      versus)
        $PY benchmarks/generate.py --device gpu --rounds 1 --repeat 3 \
            --variants ours-bf16,ours-bf16+xlaattn,ours-int8,ours-int4,hf-bf16 || status=1 ;;
      *) echo "gpu.sh: unknown part '$part' (accuracy, levers, limits, versus)"; status=2 ;;
    esac
  done
  echo "== done ($(date +%T)), status $status"
  exit $status
} 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
