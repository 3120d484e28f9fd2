#!/usr/bin/env bash
# GPU checks and measurements in priority order, planned for two calls of a 15-minute device lease (issue 28;
# docs/bench/NEXT_RUN.md has the exact commands, docs/benchmarks.md the results and how to regenerate them).
#
#   GPU_CHECK_CALL=1 bash scripts/gpu_check.sh   # call 1 of the plan below (2: call 2); GPU_CHECK_PARTS="..." picks
#   bash scripts/gpu_check.sh --cpu-dry-run      # the same parts on a CPU at tiny shapes (checks the script itself)
#
# The plan (limits in seconds; a part gets at most what is left of the call's budget, and is skipped with under 20 s):
#   call 1, budget 420 (GPU_CHECK_BUDGET_S): environment and correctness first, then the per-call measurements
#     env 30                  GPU, driver, torch, packages, CPUs, load, name lookup (environment.json)
#     tiny-cache 60           the tiny pipeline built once, outside any test (tests' fixtures then only read it)
#     pytest-gpu 150          pytest -m gpu, 90 s per test, stacks of a test still running at 75 s
#     train-random-sd35m 110  train.py through torchrun (NCCL, 1 GPU), random-init SD3.5-M: 2 epochs, then resumed
#                             to a 3rd (bf16: random weights can overflow fp16)
#     speed-probe 120         python -m fdfo.bench.probe: per-call medians, bit checks, launches, census, cost model
#     compile-probe rest      python -m fdfo.bench.compile_probe within what is left (its cap: the part's limit)
#   call 2, budget 180: what call 1 did not finish (GPU_CHECK_PARTS="$(python3 scripts/gpu_parts.py rerun ...)"),
#     then one bench epoch per headline setting (paper shapes: 512 px, T = 40, 6 pairs, micro-batches of 6, the
#     second of 2 epochs measured) as far as the time goes (about two of them; a later lease goes on from there):
#     bench-fp16 110                  the defaults (fp16, speed levers on), with the kernel profile
#     bench-fp16-compile 200          --compile, a warm start from the compile probe's compile-cache.bin
#     bench-fp16-all-on 110           CUDA graphs, fused RMS norm, compute-dtype modulation
#     bench-lowmem24 110              lowmem24's settings under a 24 GB cap
#     bench-fp16-pickscore-overlap 130  PickScore's CLIP with --reward.overlap-preprocessing
#   report 40 (both calls)    benchmarks.md of the results folder
# With a machine start of about 1.5 minutes per call, the wheels' install and the pack: 9.2 + 5.2 of the 15 minutes.
#
# Each part runs through scripts/gpu_parts.py: its log is <results>/<part>.log, its record <part>.part.json (the GPU's
# compute processes and the host load before and after it, what it left running), its line in status.txt
# `NAME: ok|FAILED|TIMED OUT|skipped (...)`; at its limit every process it started prints its stacks and is killed,
# and after it whatever it left running is killed and checked gone before the next part starts.
# Settings: GPU_CHECK_RESULTS (results folder, default ./bench-results), GPU_CHECK_PACK (a folder, e.g. the device
# tool's $OUT, that gets results.tar.gz and status.txt after every part), GPU_CHECK_BUDGET_S, GPU_CHECK_PARTS,
# GPU_CHECK_COMPILE_CACHE (the folder of a compile-cache.bin for bench-fp16-compile, default the compile probe's),
# PYTHON (default python). No downloads: random-init models, the tiny pipeline built here.

set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
export GPU_CHECK_DRY=$DRY  # 0: a GPU machine, whose parts fail without CUDA
CALL1="env tiny-cache pytest-gpu train-random-sd35m speed-probe compile-probe report"
CALL2="env bench-fp16 bench-fp16-compile bench-fp16-all-on bench-lowmem24 bench-fp16-pickscore-overlap report"
case "${GPU_CHECK_CALL:-}" in
  1) : "${GPU_CHECK_PARTS:=$CALL1}" "${GPU_CHECK_BUDGET_S:=420}" ;;
  2) : "${GPU_CHECK_PARTS:=$CALL2}" "${GPU_CHECK_BUDGET_S:=180}" ;;
esac
export GPU_CHECK_RESULTS=${GPU_CHECK_RESULTS:-./bench-results} GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
export GPU_CHECK_PARTS=${GPU_CHECK_PARTS:-} GPU_CHECK_START=$(date +%s)
RES=$GPU_CHECK_RESULTS
mkdir -p "$RES"
# offline, quiet, one tokenizer thread, no core files; the tests' tiny pipeline in the results' own cache
export PYTHONUNBUFFERED=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
WORK=${TMPDIR:-/tmp}/gpu-check-work  # scratch (test folders, the training run, the tiny pipeline): never packed
export FDFO_TINY_CACHE=${FDFO_TINY_CACHE:-$WORK/tiny-cache}
mkdir -p "$WORK"
ulimit -c 0
echo "# call ${GPU_CHECK_CALL:-all} at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD \
  2>/dev/null || echo unknown), budget ${GPU_CHECK_BUDGET_S} s, parts: ${GPU_CHECK_PARTS:-all}" | tee -a "$RES/status.txt"

part() { python3 scripts/gpu_parts.py run "$1" "$2" -- "${@:3}"; }

if [ $DRY -eq 1 ]; then  # tiny shapes on the CPU: the same parts, the same runner
  TINY=(--tiny --device cpu); BACKEND=(--backend aot_eager)  # Inductor's C++ builds take minutes on a CPU
  export GPU_CHECK_MODEL=builtin:tiny-sd3 GPU_CHECK_PRECISION=fp32
  BENCH=("$PY" -m fdfo.bench --tiny --device cpu)
  ALL_ON=(--fused-rms-norm --compute-dtype-modulation)  # CUDA graphs are refused on a CPU
  LOWMEM=(--grad-checkpoint --decode-batch 1 --rollout-device cpu --repeats 1 --hold-side-models)
  COMPILE_CACHE=(--compile-backend aot_eager); OVERLAP_BATCH=(--sample-batch 1)
else
  TINY=(); BACKEND=()
  export GPU_CHECK_MODEL=builtin:random-sd35m GPU_CHECK_PRECISION=bf16
  BENCH=("$PY" -m fdfo.bench --pairs 6 --gradient-steps 2 --sample-batch 6 --train-batch 6 --steps 40 --resolution 512
         --precision fp16)
  ALL_ON=(--cuda-graphs --fused-rms-norm --compute-dtype-modulation)
  # lowmem24: micro-batches of 2, checkpointing, rollouts in host memory, one image per decode; a buffer of the text
  # encoders' and PickScore's size held while sampling (fdfo/bench/side.py), all under a 24 GB cap
  MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
  LOWMEM=(--grad-checkpoint --sample-batch 2 --train-batch 2 --decode-batch 1 --rollout-device cpu --repeats 1
          --hold-side-models --memory-fraction "$(python3 -c "print(round(min(1.0, 24e9 / (${MIB:-0} * 2**20 or 24e9)), 4))")")
  # the compile probe's artifacts: a warm start (GPU_CHECK_COMPILE_CACHE: a folder carried from an earlier call)
  COMPILE_CACHE=(--compile-cache-dir "${GPU_CHECK_COMPILE_CACHE:-$RES/compile}")
  OVERLAP_BATCH=(--sample-batch 3)  # 2 sampling batches per epoch: one to overlap with the next
fi

part env 30 "$PY" scripts/gpu_parts.py env
part tiny-cache 60 "$PY" -c "from fdfo.models import tiny_sd3; print(tiny_sd3.tiny_sd3_path())"

# the GPU tests with the plugins of the development machine (none: the device image autoloads some eight others),
# each named as it starts (-v); pytest-timeout (in the device image) fails a test at 90 s and goes on where Python
# can be interrupted, faulthandler prints every stack of a test still running at 75 s; train.py on CUDA first, the
# CUDA pipeline comparison (first, and never finished, in the run of 2026-12-04) last
TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(-p pytest_timeout --timeout=90 --timeout-method=signal)
# (on a GPU machine a test skipped for want of CUDA fails the part: "ok" must mean the tests ran)
part pytest-gpu 150 bash -c 'set -o pipefail; "${@:2}" 2>&1 | tee "$1/pytest.out" || exit 1
  if [ "$GPU_CHECK_DRY" != 1 ] && grep -q "needs CUDA" "$1/pytest.out"; then
    echo "FAILED: tests skipped for want of CUDA on a GPU machine"; exit 1; fi' _ "$WORK" \
  env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest -v -rfEs --durations=10 -m gpu -o faulthandler_timeout=75 \
  -p no:cacheprovider --basetemp "$WORK/pytest-tmp" "${TIMEOUT[@]}" tests/test_gpu.py tests/test_sd3_speed.py \
  tests/test_cuda_graphs.py tests/test_fused.py tests/test_reward_overlap.py tests/test_generate.py

# train.py through torchrun: 2 epochs, then the same run folder to a 3rd (a resume); held-out evaluation at the start
# and at epoch 2 on 2 of the smoke prompts; the log must say NCCL (gloo on a CPU) and the resume
part train-random-sd35m 110 bash -c 'set -o pipefail; run="$1/train-run"; rm -rf "$run"
  train() { "$0" -m torch.distributed.run --standalone --nproc_per_node=1 train.py --run-dir "$run" \
    --pretrained-model "$GPU_CHECK_MODEL" --prompt-file prompt_sets/smoke.txt --reward-preset brightness \
    --total-pairs-per-epoch 2 --gradient-steps-per-epoch 1 --sample.num-solver-steps 4 --save-freq 1 \
    --image-log-freq 0 --train.precision "$GPU_CHECK_PRECISION" --eval.every 2 --eval.num-prompts 2 \
    --eval.prompts prompt_sets/smoke_heldout.txt --num-epochs "$1"; }
  train 2 || exit 1
  train 3 | tee "$run.resume.log" || exit 1
  cp "$run/log.jsonl" "$2/train-random-sd35m.log.jsonl"
  grep -q "resumed from .*epoch 2" "$run.resume.log" && test -d "$run/checkpoints/epoch-0000003"' \
  "$PY" "$WORK" "$RES"

part speed-probe 120 "$PY" -m fdfo.bench.probe "${TINY[@]}" --census-dir docs/bench/census --out "$RES/probe.json"
part compile-probe 400 "$PY" -m fdfo.bench.compile_probe "${TINY[@]}" "${BACKEND[@]}" --cap @LIMIT@ \
  --out-dir "$RES/compile"

part bench-fp16 110 "${BENCH[@]}" --profile --out "$RES/bench-fp16.json"
part bench-fp16-compile 200 "${BENCH[@]}" --compile "${COMPILE_CACHE[@]}" --out "$RES/bench-fp16-compile.json"
part bench-fp16-all-on 110 "${BENCH[@]}" "${ALL_ON[@]}" --out "$RES/bench-fp16-all-on.json"
part bench-lowmem24 110 "${BENCH[@]}" "${LOWMEM[@]}" --out "$RES/bench-lowmem24.json"
part bench-fp16-pickscore-overlap 130 "${BENCH[@]}" --reward pickscore --overlap-rewards "${OVERLAP_BATCH[@]}" \
  --out "$RES/bench-fp16-pickscore-overlap.json"

part report 40 "$PY" -m fdfo.bench --report "$RES" --out "$RES/benchmarks.md"
rm -rf "$WORK"
python3 scripts/gpu_parts.py pack
echo "done in $(($(date +%s) - GPU_CHECK_START)) s: $RES (copy it into docs/bench/<date>-<gpu>/, then"
echo "  python -m fdfo.bench --report docs/bench/<date>-<gpu> --out docs/benchmarks.md)"
