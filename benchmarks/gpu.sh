#!/usr/bin/env bash
# The device check of issue 15, one call, ≤ 8 minutes on one H200 (a time budget skips what would not fit):
#   1. the CUDA test of the store build (tests/test_store_build.py -k cuda);
#   2. the store build vs the bare batched no-grad forward over the same batches (benchmarks/bench_store.py), a
#      Llama-3.2-1B-shaped random model in bf16, 1,000 replay samples ≤ 563 tokens (target ≥ 0.85), then the same
#      with keep_states_bytes=0 (every chunk forwarded twice: what the design costs when states do not fit);
#   3. the training step, plain / ce / tm, bf16, full fine-tuning and LoRA r=16 (benchmarks/bench_step.py);
#   4. the evaluation benchmark, if benchmarks/bench_eval.py exists (arguments in EVAL_ARGS);
#   5. a 2-stage recipe (LoRA, tm) with the 1B-shaped random model (benchmarks/gpu_recipe.py --run);
#   6. the FSDP2 path: the tiny recipe, LoRA and full fine-tuning, under
#      `accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1` (wrapping, hooks, the store
#      build through FSDP2's hooks, saving); run_state.json says which distributed type accelerate ran.
# Every part's table goes to the log, its JSON next to it; summary.json lists each part's exit status and time.
# Everything lands in $OUT when set (the device tool), else benchmarks/results/gpu/.
#
# Try it on CPU with the tiny model first (184 s on the 2 shared cores here, OMP_NUM_THREADS=1):
#   OMP_NUM_THREADS=1 MODEL=tiny DEVICE=cpu DTYPE=fp32 SAMPLES=40 STEPS=6 BATCH=4 RECIPE_STEPS=3 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-llama-1b-shape}" DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bf16}"
SAMPLES="${SAMPLES:-1000}" STEPS="${STEPS:-20}" BATCH="${BATCH:-8}" RECIPE_STEPS="${RECIPE_STEPS:-10}"
BUDGET="${BUDGET:-460}"  # seconds for all parts; the device tool's limit per call is 600
EVAL_ARGS="${EVAL_ARGS:---model $MODEL --device $DEVICE --dtype $DTYPE}"
dest="${OUT:-benchmarks/results/gpu}"
mkdir -p "$dest"
log="$dest/gpu.log"
work="$(mktemp -d /tmp/gere-gpu-check-XXXXXX)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1  # no progress bars in the log
start=$SECONDS
: > "$dest/parts.tsv"

# part NAME MAX_SECONDS COMMAND...: runs COMMAND under the smaller of MAX_SECONDS and the budget left.
part() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left} s of the budget left"
    printf '%s\tskipped\t0\n' "$name" >> "$dest/parts.tsv"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit status $rc after $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$dest/parts.tsv"
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, transformers, accelerate, peft, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__, '| trl', trl.__version__)"
  echo "MODEL=$MODEL DEVICE=$DEVICE DTYPE=$DTYPE SAMPLES=$SAMPLES STEPS=$STEPS BATCH=$BATCH RECIPE_STEPS=$RECIPE_STEPS BUDGET=$BUDGET"

  part cuda_test 90 python -m pytest tests/test_store_build.py -q -k cuda -p no:cacheprovider
  part store 150 python benchmarks/bench_store.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --num-samples "$SAMPLES" --repeats 2 --io-probe --json "$dest/store.json"
  part store_two_pass 80 python benchmarks/bench_store.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --num-samples "$SAMPLES" --repeats 1 --keep-states-bytes 0 --json "$dest/store_two_pass.json"
  part step_full 110 python benchmarks/bench_step.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --replay-samples 200 --batch-size "$BATCH" --steps "$STEPS" --replay-per-step 4 --json "$dest/step_full.json"
  part step_lora 100 python benchmarks/bench_step.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --replay-samples 200 --batch-size "$BATCH" --steps "$STEPS" --replay-per-step 4 --peft 16 \
    --json "$dest/step_lora.json"
  if [ -f benchmarks/bench_eval.py ]; then
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of arguments
    part eval 60 python benchmarks/bench_eval.py $EVAL_ARGS --json "$dest/eval.json"
  else
    echo "== eval: benchmarks/bench_eval.py does not exist (yet)"
    printf 'eval\tabsent\t0\n' >> "$dest/parts.tsv"
  fi
  part recipe 120 python benchmarks/gpu_recipe.py --model "$MODEL" --device "$DEVICE" --out "$work/recipe" \
    --steps "$RECIPE_STEPS" --run --json "$dest/recipe.json"
  for kind in lora full; do
    flag=""; [ "$kind" = full ] && flag="--full"
    python benchmarks/gpu_recipe.py --model tiny --device "$DEVICE" --out "$work/fsdp2_$kind" --steps 3 \
      --replay-samples 16 $flag > /dev/null
    cpu=""; [ "$DEVICE" = cpu ] && cpu="--cpu"  # on CPUs accelerate runs no FSDP: the trial checks the plumbing
    part "fsdp2_$kind" 60 accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1 $cpu \
      -m gere_hf run "$work/fsdp2_$kind/recipe.yaml"
    python - "$work/fsdp2_$kind/run/run_state.json" "$dest/fsdp2_$kind.json" <<'EOF' || true
import json, sys
state = json.load(open(sys.argv[1]))
stages = [{k: s.get(k) for k in ("name", "status", "distributed_type", "train_seconds")} for s in state["stages"]]
json.dump({"stages": stages}, open(sys.argv[2], "w"), indent=2)
print("   stages:", ", ".join(f"{s['name']} {s['status']} under {s['distributed_type']}" for s in stages))
EOF
  done

  python - "$dest" "$((SECONDS - start))" <<'EOF'
import json, os, sys
dest, seconds = sys.argv[1], int(sys.argv[2])
parts = {}
for line in open(os.path.join(dest, "parts.tsv")):
    name, status, secs = line.rstrip("\n").split("\t")
    parts[name] = {"status": status, "seconds": int(secs)}
summary = {"seconds": seconds, "parts": parts,
           "json": sorted(f for f in os.listdir(dest) if f.endswith(".json") and f != "summary.json")}
json.dump(summary, open(os.path.join(dest, "summary.json"), "w"), indent=2)
print(f"== all parts: {seconds} s; " + ", ".join(f"{k} {v['status']} ({v['seconds']} s)" for k, v in parts.items()))
EOF
} 2>&1 | tee "$log"
rm -rf "$work"
