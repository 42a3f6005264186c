#!/usr/bin/env bash
# `make bench`: every benchmark of benchmarks/ with settings that fit in about 12 minutes on an
# otherwise idle 2-core machine, each script's figures into benchmarks/results/<script>.json (with the
# machine), then BENCHMARKS.md (benchmarks/report.py). One progress line per script with its time;
# each script's output goes to outputs/bench/<script>.log.
#
# Settings (against each script's defaults) and the time each takes here (estimates for 2 idle
# cores; each fresh process for memory pays its imports and the fused kernels' compilation, 20-50 s):
#   quant_overhead  7 rounds x 5 steps (default 3 x 10), with the torch.compile kernels side by side
#                   (--compare-compiled), + 3 fresh processes for memory                ~2 min
#   search_step     7 rounds x 5 steps (default 3 x 10), + 5 fresh processes for memory ~2.5 min
#                   (their ratios are medians over rounds: 7 rounds of 5 steps leave a slow spell in
#                   one or two rounds aside, where 3 rounds of 10 steps could not)
#   loaders         defaults (30 batches x 2 rounds, batch 128)                        ~1 min
#                   (+ ~3 min once: the JPEG tree data/imagenet_like and its beton)
#   ddp_scaling     2 rounds x 4 steps after 1 warm-up (default 10 after 3)             ~1.5 min
#   sweep_parallel  defaults without the in-process baseline (--no-in-process)         ~3 min
#   onnx_bias, search_decisiveness: not run (they read another run's outputs; the report says so)
# The progress lines give each script's time: adjust these settings if a machine needs it.
#
# Before each script the machine must be idle (under 10 % busy over 1 s, waiting at most a minute;
# the progress line says how long it took).
# MPQ_BENCH_ONLY="quant_overhead loaders" runs only those (the others' result files are kept).
# A script that fails or runs over its limit leaves a result file saying so, never older figures;
# the exit status is then 1 (after the report). Missed targets are figures, not failures.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
RESULTS="$ROOT/benchmarks/results"
LOGS="$ROOT/outputs/bench"
TREE="${MPQ_DATA_ROOT:-$ROOT/data}/imagenet_like"
ONLY=" ${MPQ_BENCH_ONLY:-} "
export RAY_USAGE_STATS_ENABLED=0 AIM_UI_TELEMETRY_ENABLED=0 GLOO_SOCKET_IFNAME=lo TQDM_DISABLE=1 PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$LOGS"

START=$SECONDS
FAILED=()
clock() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
say() { printf '[bench %s] %s\n' "$(clock $((SECONDS - START)))" "$*"; }
wanted() { [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $1 "* ]]; }

# bench NAME LIMIT_MIN ABOUT ARGS...: benchmarks/NAME.py ARGS --json results/NAME.json, within LIMIT_MIN minutes
bench() {
  local name=$1 limit=$2 about=$3
  shift 3
  wanted "$name" || return 0
  local json="benchmarks/results/$name.json" log="$LOGS/$name.log" t0 rc=0
  # the previous script's processes (Ray, DeepSpeed workers) may still be shutting down: not timed here
  say "$name: $("$PY" benchmarks/common.py idle --limit 60)"
  t0=$SECONDS
  say "$name: started (about $about) $*"
  timeout --kill-after=30 "$((limit * 60))" "$PY" "benchmarks/$name.py" "$@" --json "$json" >"$log" 2>&1 || rc=$?
  local took; took="$(clock $((SECONDS - t0)))"
  if [ $rc -eq 0 ] && [ -f "$json" ]; then
    say "$name: done in $took; $(grep '^ratio:' "$log" | tail -n 1 || true)"
    return 0
  fi
  local reason
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    reason="stopped after ${limit} min (its limit in scripts/bench.sh)"
  else
    reason="exit code $rc: $(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-300 || true)"
  fi
  "$PY" benchmarks/common.py mark "$json" --status failed --reason "$reason" --run "benchmarks/$name.py $*"
  say "$name: FAILED after $took ($reason); log: $log"
  FAILED+=("$name")
}

say "every benchmark, about 12 minutes on 2 idle cores; logs in $LOGS"
bench quant_overhead 8 "2 min" --rounds 7 --steps 5 --warmup 3 --compare-compiled
bench search_step 12 "2.5 min" --rounds 7 --steps 5

if wanted loaders && [ ! -d "$TREE/train" ]; then
  say "loaders: building the JPEG tree it reads, once ($TREE: 22,000 images, 1.1 GB, about 2 min)"
  "$PY" scripts/make_imagenet_like.py --out "$TREE" >"$LOGS/make_imagenet_like.log" 2>&1 || \
    say "loaders: could not build $TREE (see $LOGS/make_imagenet_like.log)"
fi
bench loaders 10 "1 min, +1 min the first time for the beton" --root "$TREE" --batches 30 --warmup 3 --rounds 2
bench ddp_scaling 10 "1.5 min" --steps 4 --warmup 1 --rounds 2
bench sweep_parallel 12 "3 min" --no-in-process

"$PY" benchmarks/report.py
say "all done"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "[bench] failed: ${FAILED[*]} (their rows in BENCHMARKS.md say why)" >&2
  exit 1
fi
