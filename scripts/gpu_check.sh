#!/usr/bin/env bash
# GPU checks and benchmarks in one go; see docs/benchmarks.md and README "Performance". On one H200 (2026-12-04) the
# parts took: bench-fp16 89 s, bench-fp16-k10 42 s, bench-bf16 88 s, bench-fp16-pickscore 89 s; the GPU tests, the
# compiled bench and the PickScore overlap bench needed more than the limits they had then (200, 138, 90 s). All
# parts together: about 18 minutes by those times and these limits (an estimate), more than one 15-minute device
# lease, so a lease may run a selection (its report then covers only that selection; docs/benchmarks.md is left alone):
#   GPU_CHECK_PARTS="pytest-gpu bench-lowmem24" bash scripts/gpu_check.sh
#
#   bash scripts/gpu_check.sh                 # on a CUDA machine: writes $OUT (or ./bench-results) and docs/benchmarks.md
#   bash scripts/gpu_check.sh --cpu-dry-run   # on CPU: the same steps at tiny shapes (checks the script itself)
#
# Every part is time-boxed with `timeout`; a failed or timed-out part is recorded in status.txt and the script goes
# on. Results are written as they come: <results>/*.json (one per bench run), <results>/*.log, status.txt and
# benchmarks.md. Parts are skipped once the total budget (GPU_CHECK_BUDGET_S, default 480 s) is spent.
# Needs only the requirements installed: `python` from PATH (or $PYTHON), no downloads (random-init models).

set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RES=${OUT:-./bench-results}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
mkdir -p "$RES"
STATUS="$RES/status.txt"
: >> "$STATUS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# A part that runs out of time gets SIGABRT (its process group): with the fault handler on, every Python process in it
# prints the stack of each of its threads into the part's log before it dies, so a time-out says where it was (the
# 2026-12-04 GPU tests timed out with an empty log). No core files. torchrun starts its workers in their own session,
# out of reach of that signal, and only stops them itself on SIGTERM: a part that is a torchrun launch is called with
# PART_SIGNAL=TERM (no stacks, but no worker left running).
export PYTHONFAULTHANDLER=1
ulimit -c 0

# part NAME LIMIT_S COMMAND...: run with a timeout (capped by the budget left), log to NAME.log, record the outcome.
# GPU_CHECK_PARTS="name name ...": run only these parts (a second, shorter call that reruns what failed or was skipped)
part() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${GPU_CHECK_PARTS:-}" ] && [[ " $GPU_CHECK_PARTS " != *" $name "* ]]; then
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped (budget of ${BUDGET}s spent)" | tee -a "$STATUS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout --signal="${PART_SIGNAL:-ABRT}" --kill-after=10 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    echo "$name: ok (${dt}s)" | tee -a "$STATUS"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    local where=""
    [ "${PART_SIGNAL:-ABRT}" = ABRT ] && where=" (the stacks at the time-out are at the end of $name.log)"
    echo "$name: TIMED OUT after ${limit}s$where" | tee -a "$STATUS"
  else
    echo "$name: FAILED rc=$rc (${dt}s); last lines of $name.log:" | tee -a "$STATUS"
    tail -n 5 "$RES/$name.log" | sed 's/^/    /' | tee -a "$STATUS"
  fi
}

{ echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"; echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} > "$RES/env.txt"

if [ $DRY -eq 1 ]; then
  BENCH=("$PY" -m fdfo.bench --tiny --device cpu)
  part bench-tiny-fp32 120 "${BENCH[@]}" --out "$RES/bench-tiny-fp32.json"
  part bench-tiny-ckpt 120 "${BENCH[@]}" --grad-checkpoint --hold-side-models --decode-batch 1 --out "$RES/bench-tiny-ckpt.json"
  part bench-tiny-pickscore-overlap 120 "${BENCH[@]}" --reward pickscore --overlap-rewards --sample-batch 1 \
    --out "$RES/bench-tiny-pickscore-overlap.json"
  PART_SIGNAL=TERM part train-torchrun 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py --preset smoke \
    --num-epochs 1 --total-pairs-per-epoch 4 --sample.num-solver-steps 3 --image-log-freq 0 \
    --run-dir "$RES/tmp-train-run"
  part report 60 "$PY" -m fdfo.bench --report "$RES" --out "$RES/benchmarks.md"
  rm -rf "$RES/tmp-train-run"
  echo "dry run done: $RES"
  exit 0
fi

# Parts in order of what users need most, so that a cut budget drops the least important ones.
# 1. the bench at full SD3.5-M shape, 512 px, 40 steps, the paper's micro-batches of 6 (6 pairs, 2 optimizer steps:
#    sample batch 6, train batch 6), 2 epochs with the second measured; the fp16 run also profiles one sampling
#    forward and one training micro-batch (top 15 CUDA kernels, fdfo/bench/profile.py)
BENCH=("$PY" -m fdfo.bench --pairs 6 --gradient-steps 2 --sample-batch 6 --train-batch 6 --steps 40 --resolution 512)
part bench-fp16 130 "${BENCH[@]}" --precision fp16 --profile --out "$RES/bench-fp16.json"

# 2. the GPU-only tests (tiny pipeline: fp16 / bf16 training and exact resume, NCCL under torchrun, generation equal
#    to the diffusers pipeline on CUDA, the reward overlap on CUDA; at full SD3.5-M shapes: the activation estimate
#    against CUDA memory)
# -v names each test as it starts, and faulthandler dumps every thread's stack of a test still running after 120 s
# (the 2026-12-04 run printed nothing in its 200 s); where pytest-timeout is installed (the H200 image has it), a test
# still running after 150 s fails with its stack and the others still run
# (after the part: a torchrun worker of a test cut short, found by its run folder under the tests' temporary folder)
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=150)
PYTEST_TMP=$(mktemp -d)
part pytest-gpu 300 "$PY" -m pytest -v -rfEs --durations=12 -o faulthandler_timeout=120 "${PER_TEST[@]}" -m gpu \
  -p no:cacheprovider --basetemp "$PYTEST_TMP/t"
pkill -KILL -f -- "$PYTEST_TMP" 2>/dev/null
rm -rf "$PYTEST_TMP"

# 3. K = 10 of the 40 timesteps trained, and the 24 GB cap: the lowmem24 preset's settings (micro-batches of 2,
#    gradient checkpointing, rollouts in host memory); while sampling, a buffer the size of SD3.5-M's text encoders
#    (bf16) and PickScore (fp32), 15.1 GB, stands in for the models the bench does not load (lowmem24 parks them on
#    the CPU while training, and so does the bench)
part bench-fp16-k10 90 "${BENCH[@]}" --precision fp16 --timesteps-per-sample 10 --out "$RES/bench-fp16-k10.json"
part bench-lowmem24 100 "${BENCH[@]}" --precision fp16 --grad-checkpoint --sample-batch 2 --train-batch 2 \
  --decode-batch 1 --rollout-device cpu --repeats 1 --memory-fraction 0.17 --hold-side-models --out "$RES/bench-lowmem24.json"

# 4. compiled blocks (the compile time is in the warm-up epoch, not in the measured one), then bf16
part bench-fp16-compile 300 "${BENCH[@]}" --precision fp16 --compile --out "$RES/bench-fp16-compile.json"
part bench-bf16 130 "${BENCH[@]}" --precision bf16 --out "$RES/bench-bf16.json"

# 5. a real reward shape: a random-init CLIP ViT-H/14 (PickScore's) through the real scorer, without and with
#    --reward.overlap-preprocessing; sampling batches of 3 (2 per epoch), since a single batch has no next batch to
#    overlap its preparation with
part bench-fp16-pickscore 130 "${BENCH[@]}" --precision fp16 --reward pickscore --sample-batch 3 \
  --out "$RES/bench-fp16-pickscore.json"
part bench-fp16-pickscore-overlap 150 "${BENCH[@]}" --precision fp16 --reward pickscore --overlap-rewards \
  --sample-batch 3 --out "$RES/bench-fp16-pickscore-overlap.json"

# 6. a short real training run (train.py, NCCL through torchrun) on random-init SD3.5-M shapes, no download;
#    bf16 so that random weights cannot overflow fp16 and make every reward non-finite
RUN=$(mktemp -d)
PART_SIGNAL=TERM part train-random-sd35m 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
  --pretrained-model builtin:random-sd35m --prompt-file prompt_sets/smoke.txt --reward-preset brightness \
  --num-epochs 2 --save-freq 2 --total-pairs-per-epoch 4 --gradient-steps-per-epoch 2 --image-log-freq 0 \
  --train.precision bf16 --run-dir "$RUN/run"
cp "$RUN/run/log.jsonl" "$RES/train-random-sd35m.log.jsonl" 2>/dev/null
rm -rf "$RUN"

part report 60 "$PY" -m fdfo.bench --report "$RES" --out "$RES/benchmarks.md"
if [ -z "${GPU_CHECK_PARTS:-}" ]; then
  cp "$RES/benchmarks.md" docs/benchmarks.md 2>/dev/null && echo "wrote docs/benchmarks.md (commit it with the results)"
else
  echo "a selection of parts: copy $RES/*.json into the docs/bench/ folder of the run it completes, then"
  echo "  python -m fdfo.bench --report docs/bench/<folder> --out docs/benchmarks.md"
fi
echo "done in $(($(date +%s) - START))s: $RES"
cat "$STATUS"
