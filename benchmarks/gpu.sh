#!/usr/bin/env bash
# Issue 6, benchmarks 1 and 2 on one GPU in one call (≤ 8 minutes on one H200): a Llama-3.2-1B-shaped random-init
# model, bf16, sequences ≤ 563 tokens, batch 8, 1,000 replay samples. Prints the same tables as on CPU and leaves JSON
# under benchmarks/results/gpu/ ($OUT/ too when set, for the device tool).
# Try it on CPU with a small model first:  MODEL=tiny DEVICE=cpu DTYPE=fp32 SAMPLES=40 STEPS=6 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-llama-1b-shape}" DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bf16}"
SAMPLES="${SAMPLES:-1000}" STEPS="${STEPS:-30}" BATCH="${BATCH:-8}"
dest="benchmarks/results/gpu"; mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
timeout 240 python benchmarks/bench_store.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
  --num-samples "$SAMPLES" --batch-size "$BATCH" --json "$dest/store.json"
timeout 240 python benchmarks/bench_step.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
  --replay-samples "$SAMPLES" --batch-size "$BATCH" --steps "$STEPS" --replay-per-step 4 --json "$dest/step.json"
if [ -n "${OUT:-}" ]; then cp -r "$dest" "$OUT/"; fi
