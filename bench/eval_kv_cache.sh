#!/usr/bin/env bash
# What OpenVINO's KV-cache precision costs in fidelity (README, "The KV cache's precision"):
# qwenrt eval on the demo model, English, 1,024 scored tokens, OpenVINO with a u8, f16 and f32
# cache -> bench/eval_kv_{u8,f16,f32}.{json,md}. Given a model folder converted with
# --ov-symmetric (SYM=DIR), also the AMX INT8 MLP combination with a u8 and an f16 cache
# -> bench/eval_kv_amx_mlp_{u8,f16}.{json,md} (bf16 arithmetic: a CPU whose plugin has it).
set -euo pipefail
cd "$(dirname "$0")/.."
QWENRT=${QWENRT:-.venv/bin/qwenrt}
for kv in u8 f16 f32; do
  "$QWENRT" eval --runtimes openvino --max-tokens 1024 --set "KV_CACHE_PRECISION=$kv" \
    --json "bench/eval_kv_$kv.json" --markdown "bench/eval_kv_$kv.md"
done
if [ -n "${SYM:-}" ]; then
  for kv in u8 f16; do
    "$QWENRT" eval --model "$SYM" --runtimes openvino --max-tokens 1024 --set INFERENCE_PRECISION_HINT=bf16 \
      --set DYNAMIC_QUANTIZATION_GROUP_SIZE=4294967295 --set "KV_CACHE_PRECISION=$kv" \
      --json "bench/eval_kv_amx_mlp_$kv.json" --markdown "bench/eval_kv_amx_mlp_$kv.md"
  done
fi
