#!/usr/bin/env bash
# The GPU path on a CUDA machine, in at most about 8 minutes (a few on an H200):
#   1. the tests marked `gpu` (tests/gpu: the compiled kernel backend against the reference ops, forward and
#      gradients; the FFCV loader's device transfer; bf16/fp16 training through DeepSpeed; two-pass
#      steps on CUDA), their outcome into benchmarks/results/gpu/gpu_tests.json;
#   2. benchmarks/quant_overhead.py and benchmarks/search_step.py with --device cuda, their figures
#      (time ratios, peak memory from torch's allocator) into benchmarks/results/gpu/<script>.json;
#   3. BENCHMARKS.md again, with a section for the GPU (benchmarks/report.py).
# Each step has a time limit; output goes to outputs/gpu_check/<step>.log, one line per step here.
# Without a CUDA device it prints one line and exits 2. MPQ_PYTHON picks the interpreter (default
# .venv/bin/python). Exit status: 0 when everything ran and the tests passed, 1 otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${MPQ_PYTHON:-$ROOT/.venv/bin/python}"
OUT="$ROOT/benchmarks/results/gpu"
LOGS="$ROOT/outputs/gpu_check"

if [ ! -x "$PY" ]; then
  echo "gpu_check: no Python at $PY; run make setup (or set MPQ_PYTHON)" >&2
  exit 2
fi
if ! gpu="$("$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    build = "CUDA " + torch.version.cuda if torch.version.cuda else "a CPU-only build"
    sys.exit("torch " + torch.__version__ + " (" + build + ") sees none")
print(torch.cuda.get_device_name(0))' 2>&1)"; then
  echo "gpu_check: needs a CUDA device: ${gpu##*$'\n'}; run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi

export RAY_USAGE_STATS_ENABLED=0 AIM_UI_TELEMETRY_ENABLED=0 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$LOGS"
START=$SECONDS
FAILED=()
LAST_RC=0
say() { printf '[gpu_check %ds] %s\n' $((SECONDS - START)) "$*"; }

# step NAME LIMIT_S COMMAND...: run COMMAND within LIMIT_S seconds, its output into outputs/gpu_check/NAME.log
step() {
  local name=$1 limit=$2 rc=0
  shift 2
  say "$name: started (limit ${limit} s)"
  timeout --kill-after=20 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  LAST_RC=$rc
  if [ $rc -eq 0 ]; then
    say "$name: done; $(grep -E '^ratio:|passed|failed|skipped|error' "$LOGS/$name.log" | tail -n 1 || true)"
  else
    say "$name: FAILED (exit code $rc$([ $rc -eq 124 ] && echo ", over ${limit} s")); log: $LOGS/$name.log"
    FAILED+=("$name")
  fi
  return 0
}

say "CUDA device: $gpu; results in $OUT"
pytest_cmd=("$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --junitxml "$LOGS/gpu_tests.xml")
rm -f "$LOGS/gpu_tests.xml"
step gpu_tests 150 "${pytest_cmd[@]}"
"$PY" benchmarks/common.py junit "$LOGS/gpu_tests.xml" "$OUT/gpu_tests.json" --run "pytest -m gpu tests/gpu"

# limits: 150 + 150 + 180 s = 8 min at most, a few minutes in all when the kernels compile quickly
for name in quant_overhead search_step; do
  rm -f "$OUT/$name.json"
  limit=150
  [ "$name" = search_step ] && limit=180  # 5 variants, each compiled again in its memory process
  step "$name" "$limit" "$PY" "benchmarks/$name.py" --device cuda --rounds 3 --steps 10 --json "$OUT/$name.json"
  if [ ! -f "$OUT/$name.json" ]; then
    reason="exit code $LAST_RC: $(grep -v '^[[:space:]]*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-300 || true)"
    [ "$LAST_RC" -eq 124 ] && reason="stopped after $limit s (its limit in scripts/gpu_check.sh)"
    "$PY" benchmarks/common.py mark "$OUT/$name.json" --status failed --run "benchmarks/$name.py --device cuda" \
      --reason "$reason"
  fi
done

"$PY" benchmarks/report.py
say "all done"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${FAILED[*]} (logs in $LOGS)" >&2
  exit 1
fi
