#!/usr/bin/env bash
# One-shot check and measurement on a GPU machine (offline, <= GPU_CHECK_BUDGET_S seconds, default 480):
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --quick    # CI on CPU: no install, a small AOT sweep, GPU stages skipped
#
# Stages, each with its own timeout (and never past the overall budget), logs in $OUT (or a temp dir):
#   install   pip install --no-deps --no-build-isolation -e . against the machine's own torch
#             (if the C++ extension fails to build: again with PPO_DDPM_SKIP_EXT=1, so the rest can run)
#   kernels   every kernel natively vs float64 maths: tests/test_kernel_{ddim_step,gaussian_log_ratio,
#             ppo_trajectory,multiblock}.py (incl. B=64 x 3x256x256 on the device's own split)
#   cuda      the CUDA tests: pytest -m cuda (CUDA graphs == eager for the same seed: rollout, ratio pass and the
#             with-grad micro-batch step's gradient, fp32 / no TF32 / bf16 + channels_last; CUDA rollout cache)
#   aot       python -m ppo_ddpm.kernels.aot: every launch compiled for sm_90 and sm_80, 0 spills
#   bench-*   pytest benchmarks/test_bench_{kernels,memory,ppo,precision}.py --benchmark-only, JSON in $OUT
#             (precision: one PPO iteration in fp32 / fp32 without TF32 / fp32 without graphs / bf16 / bf16 + channels_last)
# then a compact summary table (scripts/gpu_check_summary.py). Exit status 1 if a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --quick or --help)" >&2; exit 2 ;;
  esac
done

OUT_DIR="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$OUT_DIR"
STAGES="$OUT_DIR/stages.tsv"
: > "$STAGES"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
START=$SECONDS
PY="${PYTHON:-python}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # native kernels; the interpreter is for machines without a GPU

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STAGES"; }
skip() { record "$1" SKIP 0 "$2"; echo "== $1: SKIP ($2)"; }

# stage NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $OUT_DIR/NAME.log, within the budget.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if (( left < 20 )); then skip "$name" "budget of ${BUDGET} s spent"; return 1; fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit} s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  local secs=$((SECONDS - t0)) detail
  detail=$(grep -E '[0-9]+ (passed|failed|errors?)\b' "$OUT_DIR/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')
  if (( rc == 0 )); then
    record "$name" PASS "$secs" "$detail"
  elif (( rc == 124 || rc == 137 )); then
    record "$name" TIMEOUT "$secs" "killed after ${limit} s; see $name.log"
  else
    [[ -z "$detail" ]] && detail="exit $rc: $(tail -1 "$OUT_DIR/$name.log" | cut -c1-160)"
    record "$name" FAIL "$secs" "$detail"
  fi
  echo "   -> $(tail -1 "$STAGES" | cut -f2-)"
  return $rc
}

HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
NO_GPU="no CUDA device (torch.cuda.is_available() is False)"

if (( QUICK )); then
  skip install "--quick: the package is already installed"
else
  if ! stage install 300 "$PY" -m pip install --no-deps --no-build-isolation -e .; then
    stage install-noext 120 env PPO_DDPM_SKIP_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
  fi
fi
"$PY" -c 'import ppo_ddpm.kernels' 2>/dev/null || echo "gpu_check: ppo_ddpm does not import; the stages below will fail" >&2

if (( HAS_CUDA )); then
  stage kernels 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_ddim_step.py tests/test_kernel_gaussian_log_ratio.py \
    tests/test_kernel_ppo_trajectory.py tests/test_kernel_multiblock.py
  # the kernels stage already ran test_kernel_multiblock.py whole, its CUDA-marked B=64 cases included
  stage cuda 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests --ignore=tests/test_kernel_multiblock.py
else
  skip kernels "$NO_GPU; the CPU suite runs them in Triton's interpreter"
  skip cuda "$NO_GPU"
fi

if (( QUICK )); then
  stage aot 240 "$PY" -m ppo_ddpm.kernels.aot --arch 90 --max-batch 1 --json "$OUT_DIR/aot.json"
else
  stage aot 240 "$PY" -m ppo_ddpm.kernels.aot --json "$OUT_DIR/aot.json"
fi

if (( HAS_CUDA )); then
  for group in kernels memory ppo precision; do
    stage "bench-$group" 300 "$PY" -m pytest -q -p no:cacheprovider "benchmarks/test_bench_$group.py" --benchmark-only \
      --benchmark-json "$OUT_DIR/bench_$group.json"
  done
  ls "$OUT_DIR"/bench_*.json > /dev/null 2>&1 && "$PY" -m benchmarks.report "$OUT_DIR"/bench_*.json > "$OUT_DIR/report.md" 2>&1
else
  for group in kernels memory ppo precision; do skip "bench-$group" "$NO_GPU; the CPU figures come from pytest benchmarks --benchmark-only"; done
fi

"$PY" scripts/gpu_check_summary.py "$OUT_DIR" --elapsed $((SECONDS - START)) --budget "$BUDGET"
echo "logs, JSON and report.md: $OUT_DIR"
awk -F'\t' '$2 == "FAIL" || $2 == "TIMEOUT" { bad = 1 } END { exit bad }' "$STAGES"
