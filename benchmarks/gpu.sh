#!/usr/bin/env bash
# The device check, one call, ≤ 8 minutes on one H200 (a time budget skips what would not fit), on the bare GPU
# machine as it is: the wheels it lacks travel in .whl/ (benchmarks/gpu_wheels.py fetch, here) and are installed with
# `pip install --no-index --no-deps --target` and put first on PYTHONPATH; gere_hf itself runs from this tree.
#   0. the environment: versions in use, unmet requirements, the machine's pip list (packages.txt), and the device's
#      ceilings (bf16 matrix product, copy bandwidth: benchmarks/device_ceiling.py);
#   1. the CUDA tests (pytest -k cuda);
#   2. the store build vs the bare batched no-grad forward over the same batches (benchmarks/bench_store.py), a
#      Llama-3.2-1B-shaped random model in bf16, 1,000 replay samples ≤ 563 tokens (target ≥ 0.85);
#   3. the training step, plain / ce / tm, bf16, full fine-tuning and LoRA r=16 (benchmarks/bench_step.py), with MFU;
#   4. the evaluation benchmark (benchmarks/bench_eval.py; arguments in EVAL_ARGS);
#   5. a 2-stage recipe (LoRA, tm) with the 1B-shaped random model (benchmarks/gpu_recipe.py --run);
#   6. the FSDP2 path: the tiny recipe, LoRA and full fine-tuning, under
#      `accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1` (wrapping, hooks, the store
#      build through FSDP2's hooks, saving); run_state.json says which distributed type accelerate ran;
#   7. diagnostics of the step, if time is left: plain / ce again with PyTorch's expandable-segments allocator
#      (variable shapes without allocator cache misses), a torch.profiler view of both (device busy time, top
#      kernels, allocator calls and synchronisations per step), and with task batches padded to a multiple of 64
#      (fewer shapes: each new length costs cuDNN's attention a new plan);
#   8. the store build again with keep_states_bytes=0 (every chunk forwarded twice), if time is left.
# PARTS=name,name,... runs only those parts (a rerun of what failed).
# Three files come back (the device tool brings at most 8): gpu.log (every part's table), packages.txt, and
# results.json (each part's exit status, seconds and JSON).
# Everything lands in $OUT when set (the device tool), else benchmarks/results/gpu/.
#
# On the device (from the repository root, after `python benchmarks/gpu_wheels.py fetch` here):
#   device run, carry [".whl"], command: bash benchmarks/gpu.sh
# Try it on CPU with the tiny model first (docs/lab/benchmarks.md, "The GPU check": a venv holding only what the GPU
# machine holds, plus the wheels fetched for its Python):
#   OMP_NUM_THREADS=1 MODEL=tiny DEVICE=cpu DTYPE=fp32 SAMPLES=40 STEPS=6 BATCH=4 RECIPE_STEPS=3 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-llama-1b-shape}" DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bf16}"
SAMPLES="${SAMPLES:-1000}" STEPS="${STEPS:-20}" BATCH="${BATCH:-8}" RECIPE_STEPS="${RECIPE_STEPS:-10}"
BUDGET="${BUDGET:-390}"  # seconds for all parts; the device tool's limit per call is 600
WHEELS="${WHEELS:-.whl}" PY="${PYTHON:-python3}"
EVAL_ARGS="${EVAL_ARGS:---model $MODEL --device $DEVICE --dtype $DTYPE}"
dest="${OUT:-benchmarks/results/gpu}"
mkdir -p "$dest"
log="$dest/gpu.log"
work="$(mktemp -d /tmp/gere-gpu-check-XXXXXX)"
json="$work/json"
mkdir -p "$json"
start=$SECONDS
: > "$work/parts.tsv"

# part NAME MAX_SECONDS COMMAND...: runs COMMAND under the smaller of MAX_SECONDS and the budget left.
part() {
  local name=$1 limit=$2; shift 2
  if [ -n "${PARTS:-}" ] && [[ ",$PARTS," != *",$name,"* ]]; then
    return
  fi
  local left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left} s of the budget left"
    printf '%s\tskipped\t0\n' "$name" >> "$work/parts.tsv"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit status $rc after $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$work/parts.tsv"
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    t0=$SECONDS
    site="$work/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl \
      || echo "== wheels: the install from $WHEELS failed"
    export PYTHONPATH="$site"
    echo "== wheels: $(ls "$WHEELS"/*.whl | wc -l) from $WHEELS installed in $((SECONDS - t0)) s, first on PYTHONPATH"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1  # no progress bars
  export MODEL DEVICE DTYPE SAMPLES STEPS BATCH RECIPE_STEPS BUDGET PARTS="${PARTS:-}"
  "$PY" benchmarks/gpu_wheels.py check --wheels "$WHEELS" --out "$dest"
  echo "MODEL=$MODEL DEVICE=$DEVICE DTYPE=$DTYPE SAMPLES=$SAMPLES STEPS=$STEPS BATCH=$BATCH RECIPE_STEPS=$RECIPE_STEPS BUDGET=$BUDGET PARTS=${PARTS:-all}"

  part ceiling 40 "$PY" benchmarks/device_ceiling.py --device "$DEVICE" --json "$json/ceiling.json"
  part cuda_tests 90 "$PY" -m pytest tests/test_store_build.py tests/test_trainer.py -q -k cuda -p no:cacheprovider -rs
  part store 120 "$PY" benchmarks/bench_store.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --num-samples "$SAMPLES" --repeats 2 --io-probe --json "$json/store.json"
  part step_full 100 "$PY" benchmarks/bench_step.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --replay-samples 200 --batch-size "$BATCH" --steps "$STEPS" --replay-per-step 4 --ceiling "$json/ceiling.json" \
    --json "$json/step_full.json"
  part step_lora 100 "$PY" benchmarks/bench_step.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --replay-samples 200 --batch-size "$BATCH" --steps "$STEPS" --replay-per-step 4 --peft 16 \
    --ceiling "$json/ceiling.json" --json "$json/step_lora.json"
  # shellcheck disable=SC2086  # EVAL_ARGS is a list of arguments
  part eval 60 "$PY" benchmarks/bench_eval.py $EVAL_ARGS --json "$json/eval.json"
  part recipe 100 "$PY" benchmarks/gpu_recipe.py --model "$MODEL" --device "$DEVICE" --out "$work/recipe" \
    --steps "$RECIPE_STEPS" --run --json "$json/recipe.json"
  for kind in lora full; do
    flag=""; [ "$kind" = full ] && flag="--full"
    "$PY" benchmarks/gpu_recipe.py --model tiny --device "$DEVICE" --out "$work/fsdp2_$kind" --steps 3 \
      --replay-samples 16 $flag > /dev/null
    cpu=""; [ "$DEVICE" = cpu ] && cpu="--cpu"  # on CPUs accelerate runs no FSDP: the trial checks the plumbing
    part "fsdp2_$kind" 60 "$PY" -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml \
      --num_processes 1 $cpu -m gere_hf run "$work/fsdp2_$kind/recipe.yaml"
    "$PY" - "$work/fsdp2_$kind/run/run_state.json" "$json/fsdp2_$kind.json" <<'EOF' || true
import json, sys
state = json.load(open(sys.argv[1]))
stages = [{k: s.get(k) for k in ("name", "status", "distributed_type", "train_seconds")} for s in state["stages"]]
json.dump({"stages": stages}, open(sys.argv[2], "w"), indent=2)
print("   stages:", ", ".join(f"{s['name']} {s['status']} under {s['distributed_type']}" for s in stages))
EOF
  done
  step_args=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --replay-samples 200 --batch-size "$BATCH"
    --steps "$STEPS" --replay-per-step 4 --modes plain,ce)
  part step_expandable 80 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PY" benchmarks/bench_step.py \
    "${step_args[@]}" --json "$json/step_expandable.json"
  part step_profile 90 "$PY" benchmarks/bench_step.py "${step_args[@]}" --profile 5 --json "$json/step_profile.json"
  part step_padded 80 "$PY" benchmarks/bench_step.py "${step_args[@]}" --pad-to-multiple-of 64 \
    --json "$json/step_padded.json"
  part store_two_pass 60 "$PY" benchmarks/bench_store.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --num-samples "$SAMPLES" --repeats 1 --keep-states-bytes 0 --json "$json/store_two_pass.json"

  "$PY" - "$work" "$dest" "$((SECONDS - start))" <<'EOF'
import json, os, sys
work, dest, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
parts = {}
for line in open(os.path.join(work, "parts.tsv")):
    name, status, secs = line.rstrip("\n").split("\t")
    parts[name] = {"status": status, "seconds": int(secs)}
results = {"seconds": seconds, "parts": parts, "environment": {k: os.environ.get(k) for k in (
    "MODEL", "DEVICE", "DTYPE", "SAMPLES", "STEPS", "BATCH", "RECIPE_STEPS", "BUDGET", "PARTS")}}
for f in sorted(os.listdir(os.path.join(work, "json"))):
    results[f[:-5]] = json.load(open(os.path.join(work, "json", f)))
json.dump(results, open(os.path.join(dest, "results.json"), "w"), indent=2)
print(f"== all parts: {seconds} s; " + ", ".join(f"{k} {v['status']} ({v['seconds']} s)" for k, v in parts.items()))
EOF
} 2>&1 | tee "$log"
rm -rf "$work"
