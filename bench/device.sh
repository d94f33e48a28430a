#!/usr/bin/env bash
# One prepared GPU benchmark run (the `device` tool: 15 minutes in all, one call).
#
#   run(command="bash bench/device.sh", carry=[".whl"], timeout_s=560)
#   BATCH=128 BUDGET_S=300 bash bench/device.sh      # another batch, a shorter budget
#   ONLY="teacher" bash bench/device.sh               # only the rows whose label matches
#   ONLY="infer jax" BATCH=1 IMAGE_SIZE=32 BUDGET_S=30 bash bench/device.sh  # CPU dry run
#
# Installs what the GPU image lacks from carried wheels (.whl/: ml_collections, fetched
# here with `pip download ml_collections -d .whl`; the image's own jax 0.11 + flax 0.12.10
# are used, a carried flax 0.12.8 does not import on jax 0.11), then measures, at 224 x 224
# and one batch size, most important first, each configuration in its own process under
# its own time cap:
#   - the baseline a PyTorch user tuning for speed runs: bf16 autocast + channels_last +
#     torch.compile (+ fused AdamW), training with and without the ResNet-50 teacher, and
#     inference; warm-up (compile) seconds reported apart;
#   - JAX with the bfloat16 policy (`--config.model.dtype_policy=bfloat16`), float32 (true
#     float32 products, Precision.HIGHEST) and tf32 (float32 storage, the GPU's default
#     TF32 products), the model in evaluation mode and the deploy artefact;
#   - what TF32 products change against true float32 (bench/precision.py --policy tf32:
#     flipped binary activations, top-1 agreement; $OUT/precision_tf32/);
#   - the released recipe's PyTorch fp32 eager;
#   - a profile of the JAX bfloat16 training step (bench/profile_step.py);
#   - end-to-end training through the input pipeline (bench/end_to_end.py), when the
#     prepared data set .e2e_data is carried (see its row below).
# $OUT/device_results.md (a table with the ratio to the torch.compile rows) grows as
# results arrive, so a run cut off by the budget still reports what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-470}   # start no configuration after this many seconds
B=${BATCH:-256}
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
table() {
  python3 - "$results" > "$OUT/device_results.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = {}
for r in rows:  # the torch.compile rows are the baselines
  if "result" in r and r["result"].get("path", "").endswith("_compile"):
    base[(r["bench"], r["result"].get("teacher", False))] = r["result"]["images_per_s"]
print("| configuration | images/s | median step (s) | warm-up (s) | peak GPU MB | vs torch bf16+compile |")
print("|---|---|---|---|---|---|")
for r in rows:
  if "error" in r:
    print(f"| {r['label']} | failed or over its time cap ({r['cap']} s) | | | | |")
    continue
  x = r["result"]
  b = base.get((r["bench"], x.get("teacher", False)))
  ratio = f"{x['images_per_s'] / b:.2f}x" if b else ""
  print(f"| {r['label']} | {x['images_per_s']} | {x['step_time_s_median']} | "
        f"{x.get('warmup_s', '')} | {x.get('peak_device_mb', '')} | {ratio} |")
PY
}
row() {  # row <cap_s> <script> <label> <args...>
  local cap=$1 script=$2 label=$3; shift 3
  if [[ -n "${ONLY:-}" && ! "$label" =~ $ONLY ]]; then return; fi
  if (( $(date +%s) - start > BUDGET_S )); then echo "skip (budget) $label"; return; fi
  local line
  line=$(timeout "$cap" python3 "bench/$script" "$@" --batch "$B" --image_size "${IMAGE_SIZE:-224}" \
         --warmup 2 --repeats 5 \
         --json 2>"$OUT/last_err.txt" | tail -1)
  if [[ "$line" == \{* ]]; then
    echo "{\"bench\": \"$script\", \"label\": \"$label\", \"result\": $line}" >> "$results"
    echo "$label: $line"
  else
    echo "$label: FAILED $(tail -3 "$OUT/last_err.txt" | tr '\n' ' ')"
    cp "$OUT/last_err.txt" "$OUT/failed_$(echo "$label" | tr -c 'a-zA-Z0-9' '_').txt"
    echo "{\"bench\": \"$script\", \"label\": \"$label\", \"error\": true, \"cap\": $cap}" >> "$results"
  fi
  table
}
row 300 train_step.py "train torch bf16+channels_last+compile b$B" --framework torch --precision bf16 --compile
row 150 train_step.py "train jax bf16 policy b$B" --framework jax --policy bfloat16 --precision auto
row 120 train_step.py "train jax float32 (true fp32 products) b$B" --framework jax --policy float32 --precision float32
row 120 train_step.py "train jax tf32 (default products) b$B" --framework jax --policy tf32 --precision float32
row 150 train_step.py "train jax bf16 policy + diagnostics every step b$B" --framework jax --policy bfloat16 --precision auto --diagnostics
row 200 inference.py "infer torch bf16+channels_last+compile b$B" --framework torch --path bf16-compile
row 100 inference.py "infer jax model bf16 policy b$B" --framework jax --path bfloat16 --policy bfloat16
row 100 inference.py "infer jax deploy-int8 b$B" --framework jax --path deploy-int8
row 150 train_step.py "train jax bf16 policy + teacher b$B" --framework jax --policy bfloat16 --teacher
row 300 train_step.py "train torch bf16+channels_last+compile + teacher b$B" --framework torch --precision bf16 --compile --teacher
row 150 train_step.py "train jax bf16 policy, int8 binary convs b$B" --framework jax --policy bfloat16 --precision int8
row 100 inference.py "infer jax model bf16 policy, int8 b$B" --framework jax --path int8 --policy bfloat16
row 90 train_step.py "train torch fp32 eager (as released) b$B" --framework torch --precision fp32
row 60 inference.py "infer torch fp32 eager (as released) b$B" --framework torch --path fp32
row 60 inference.py "infer jax model float32 (true fp32 products) b$B" --framework jax --path float32 --policy float32
row 60 inference.py "infer jax model tf32 (default products) b$B" --framework jax --path float32 --policy tf32
if [[ ( -z "${ONLY:-}" || "precision tf32" =~ $ONLY ) ]] && (( $(date +%s) - start <= BUDGET_S )); then
  # accuracy, not speed: TF32 against true float32 on the same weights
  timeout 150 python3 bench/precision.py --policy tf32 --images 64 --batch 32 \
    --full_size "${IMAGE_SIZE:-224}" --out "$OUT/precision_tf32" \
    > "$OUT/precision_tf32.txt" 2>&1 || echo "precision tf32: failed or over 150 s"
fi
# End-to-end training through the input pipeline (bench/end_to_end.py: main.py on a
# synthetic imagenet2012 in ArrayRecord format; end-to-end images/s, step-only images/s and
# the fraction of time the step waited for input). The GPU image lacks the data set and the
# input pipeline's packages, so both are carried (64 MiB in all):
#   python bench/end_to_end.py --data_dir .e2e_data --images 320 --classes 4 --steps 2 \
#       --batch 2 --image_size 32 --arch bcdnet_a --skip_step_only   # here, once (~35 MiB)
#   pip download --no-deps -d .whl grain array_record tensorflow-datasets etils \
#       promise simple_parsing dm-tree ...   # what `pip install` says is missing there
#   run(command="ONLY=end_to_end bash bench/device.sh", carry=[".whl", ".e2e_data"])
if [[ "end_to_end b$B" =~ ${ONLY:-.} && -d .e2e_data ]] && (( $(date +%s) - start <= BUDGET_S )); then
  timeout 240 python3 bench/end_to_end.py --data_dir .e2e_data --images "${E2E_IMAGES:-320}" \
    --classes "${E2E_CLASSES:-4}" --steps "${E2E_STEPS:-40}" --batch "$B" \
    --image_size "${IMAGE_SIZE:-224}" --policy bfloat16 --json \
    > "$OUT/end_to_end_b$B.txt" 2>&1 || echo "end_to_end: failed or over 240 s"
  tail -1 "$OUT/end_to_end_b$B.txt"
fi
if [[ -z "${ONLY:-}" ]] && (( $(date +%s) - start <= BUDGET_S )); then
  timeout 120 python3 bench/profile_step.py --policy bfloat16 --batch "$B" --top 30 \
    --image_size "${IMAGE_SIZE:-224}" \
    > "$OUT/profile_bf16_b$B.txt" 2>&1 || echo "profile: failed or over 120 s"
fi
table
cat "$OUT/device_results.md"
