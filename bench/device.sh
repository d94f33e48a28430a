#!/usr/bin/env bash
# One prepared GPU benchmark run (the `device` tool: 15 minutes in all, one call).
#
#   run(command="bash bench/device.sh", carry=[".whl"], timeout_s=540)
#   BATCHES="256" BUDGET_S=140 bash bench/device.sh     # a subset
#
# Installs what the GPU image lacks from carried wheels (.whl/: ml_collections, fetched
# here with `pip download`, see README "Speed"; the image's own jax 0.11 + flax 0.12.10
# are used, a carried flax 0.12.8 does not import on jax 0.11), then measures
# training steps and inference at 224x224 for batch 64/128/256: JAX float32, bfloat16 and
# int8 binary convs (all exact), PyTorch fp32 and bf16 autocast + channels_last. Each
# configuration runs in its own process under a time cap, most important first, and the
# table in $OUT/device_results.md grows as results arrive, so a cut-off run still reports.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-480}   # stop starting new configurations after this many seconds
CAP_S=${CAP_S:-75}          # per configuration
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

start=$(date +%s)
results="$OUT/device_results.jsonl"
: > "$results"
run() {  # run <script> <label> <args...>
  local script=$1 label=$2; shift 2
  if (( $(date +%s) - start > BUDGET_S )); then echo "skip (budget) $label"; return; fi
  local line
  line=$(timeout "$CAP_S" python3 "bench/$script" "$@" --warmup 2 --repeats 5 --json 2>"$OUT/last_err.txt" | tail -1)
  if [[ "$line" == \{* ]]; then
    echo "{\"bench\": \"$script\", \"label\": \"$label\", \"result\": $line}" >> "$results"
    echo "$label: $line"
  else
    echo "$label: FAILED $(tail -3 "$OUT/last_err.txt" | tr '\n' ' ')"
    echo "{\"bench\": \"$script\", \"label\": \"$label\", \"error\": true}" >> "$results"
  fi
}
for b in ${BATCHES:-128 64 256}; do
  run train_step.py "train torch fp32 b$b" --framework torch --precision fp32 --batch $b
  run train_step.py "train torch bf16 b$b" --framework torch --precision bf16 --batch $b
  run train_step.py "train jax float32 b$b" --framework jax --precision float32 --batch $b
  run train_step.py "train jax bfloat16 b$b" --framework jax --precision bfloat16 --batch $b
  run train_step.py "train jax int8 b$b" --framework jax --precision int8 --batch $b
  run inference.py "infer torch fp32 b$b" --framework torch --path fp32 --batch $b
  run inference.py "infer torch bf16 b$b" --framework torch --path bf16 --batch $b
  run inference.py "infer jax float32 b$b" --framework jax --path float32 --batch $b
  run inference.py "infer jax bfloat16 b$b" --framework jax --path bfloat16 --batch $b
  run inference.py "infer jax int8 b$b" --framework jax --path int8 --batch $b
  run inference.py "infer jax deploy-int8 b$b" --framework jax --path deploy-int8 --batch $b
done
python3 - "$results" > "$OUT/device_results.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| configuration | images/s | median step (s) | peak GPU MB |")
print("|---|---|---|---|")
for r in rows:
  if "error" in r:
    print(f"| {r['label']} | failed or over the time cap | | |")
  else:
    x = r["result"]
    print(f"| {r['label']} | {x['images_per_s']} | {x['step_time_s_median']} | "
          f"{x.get('peak_device_mb', '')} |")
PY
cat "$OUT/device_results.md"
