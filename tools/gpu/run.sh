#!/usr/bin/env bash
# The GPU check: one command that runs every CUDA path of the project and keeps everything it measured
# in OUT_DIR, even when a step fails, hangs or runs out of time (tools/gpu/README.md).
#
#   bash tools/gpu/run.sh OUT_DIR [--rehearse] [--time-scale F] [--experiment-config PATH]
#     on a CUDA machine (H100/H200): whole run <= 400 s, so that a second run fits in a 15-minute lease
#     --rehearse              on a CPU: the same steps, Triton interpreter, tiny shapes, plus the sm_90
#                             ahead-of-time compile of every kernel
#     --time-scale F          every step's limit (and the overall budget) times F (> 0): F = 0.05 cuts
#                             the steps and shows that each leaves its partial results
#     --experiment-config P   the experiment step's configuration (default configs/experiments/bb-massive-gpu.yaml;
#                             --rehearse: with the overrides of its .rehearsal file)
#
# Steps, each under its own time limit (seconds; GPU_LIMIT_<STEP> overrides, 0 skips) inside an overall
# budget (GPU_CHECK_BUDGET_S, default 400 s on a GPU) that shortens the last steps when earlier ones ran
# long; a limit ends the step with SIGINT (then SIGKILL 15 s later): pytest writes its JUnit file, the
# benchmarks their JSON. After each step tools/gpu/summarize.py rewrites OUT_DIR/summary.{json,md}:
#   setup            offline install of .gpu-bundle/ (tools/gpu/bundle.sh) with --no-deps into a private
#                    --target folder on PYTHONPATH; the preinstalled torch/triton are never touched
#   env              device, driver, versions, SDPA's backend, every import the checks need (env_report.py)
#   aot_sm90         (--rehearse only) every Triton kernel compiled ahead of time for sm_90
#   bench_attention  SDPA vanilla, megatron-core off-by-one, Softmax_1 / learnable / gated (torch's fused
#                    kernels + the sink) and clipped (Triton), bf16, causal, the headline shapes (d 128,
#                    sq 4096 and 16384) first: fwd, fwd+bwd, peak memory; JSON after every shape
#   bench_train      OPT-125m vanilla / Softmax_1 / gated Softmax_1 through megatron-core + DeepSpeed
#                    ZeRO-1, bf16: tokens/s, MFU, peak memory; JSON after every round
#   tests            pytest tests/ops -m "not slow" on the GPU (gpu-marked tests included), xdist where
#                    available; JUnit XML even when cut
#   experiment       the science experiment's GPU configuration; packed (files < 4 MiB) AFTER it returns
# OUT_DIR gets at most 7 files (8 come back from the lent machine): run.log, tests.xml, bench_attention.json,
# bench_train.json, experiment.tar.gz, summary.json, summary.md.
# Environment: PYTHON (default python3), GPU_BUNDLE (default ROOT/.gpu-bundle), GPU_SITE (private
# install folder, default a fresh temporary one).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="" REHEARSE=0 SCALE=1 EXP_CFG="configs/experiments/bb-massive-gpu.yaml"
usage="expected 'bash tools/gpu/run.sh OUT_DIR [--rehearse] [--time-scale F] [--experiment-config PATH]'"
while (( $# )); do
  case "$1" in
    --rehearse) REHEARSE=1 ;;
    --time-scale|--experiment-config)
      if (( $# < 2 )); then echo "run.sh: $1 needs a value: $usage" >&2; exit 2; fi
      if [[ "$1" == --time-scale ]]; then SCALE="$2"; else EXP_CFG="$2"; fi
      shift ;;
    -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run.sh: unknown option '$1': $usage" >&2; exit 2 ;;
    *) if [[ -n "$OUT" ]]; then echo "run.sh: two output folders '$OUT' and '$1': expected one OUT_DIR" >&2; exit 2; fi
       OUT="$1" ;;
  esac
  shift
done
if [[ -z "$OUT" ]]; then echo "run.sh: no OUT_DIR: $usage" >&2; exit 2; fi
if ! [[ "$SCALE" =~ ^[0-9]*\.?[0-9]+$ ]] || awk -v f="$SCALE" 'BEGIN { exit !(f <= 0) }'; then
  echo "run.sh: --time-scale '$SCALE': expected a positive number (e.g. 0.05)" >&2; exit 2
fi
if [[ -e "$OUT" && ! -d "$OUT" ]]; then echo "run.sh: OUT_DIR '$OUT' is a file: expected a new or empty folder" >&2; exit 2; fi
if [[ -d "$OUT" && -n "$(ls -A "$OUT")" ]]; then
  echo "run.sh: OUT_DIR '$OUT' is not empty: expected a new or empty folder (nothing is overwritten)" >&2; exit 2
fi
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import torch' 2>/dev/null; then echo "run.sh: PYTHON '$PY' cannot import torch: expected the Python that has torch" >&2; exit 2; fi
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/outeff-gpu.XXXXXX")"      # scratch: removed at the very end, after packing
SITE="${GPU_SITE:-$WORK/site}"
BUNDLE="${GPU_BUNDLE:-$ROOT/.gpu-bundle}"
export PY SITE BUNDLE WORK OUT
T0=$(date +%s)
scaled() { awk -v x="$1" -v f="$SCALE" 'BEGIN { printf "%d", x * f }'; }
if (( REHEARSE )); then
  BUDGET="$(scaled "${GPU_CHECK_BUDGET_S:-7200}")"
  export TRITON_INTERPRET=1            # before any kernel is decorated
else
  BUDGET="$(scaled "${GPU_CHECK_BUDGET_S:-400}")"
  unset TRITON_INTERPRET
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # the GPU machine has no network
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
cd "$ROOT"
echo "== GPU check $(date -u +%FT%TZ) on $(hostname), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
     "$( (( REHEARSE )) && echo '(CPU REHEARSAL: Triton interpreter, tiny shapes)')"
echo "   OUT_DIR $OUT, scratch $WORK, overall budget ${BUDGET}s, time scale $SCALE"

summarize() {
  "$PY" tools/gpu/summarize.py --output-dir "$OUT" --work "$WORK" --time-scale "$SCALE" --budget "$BUDGET" \
    $( (( REHEARSE )) && echo --rehearsal ) || echo "!! summarize.py failed (rc $?)"
}

# run_step NAME LIMIT_S NOTE CMD...: the command under `timeout -s INT` (SIGKILL 15 s later), its limit
# shortened to what the overall budget leaves (10 s kept for the summary); status, rc and seconds
# appended to WORK/steps.jsonl, then the summary rewritten.
run_step() {
  local name="$1" limit="$2" note="$3"; shift 3
  local left=$(( BUDGET - ($(date +%s) - T0) - 10 )) why="overall budget spent"
  (( limit < 5 )) && why="limit $limit s (GPU_LIMIT_* = 0, or scaled below 5 s)"
  (( left < limit )) && limit=$left
  if (( limit < 5 )); then
    echo "== [$name] SKIPPED: $why"
    printf '{"name": "%s", "status": "skipped", "rc": null, "seconds": 0, "limit_s": 0, "note": "%s"}\n' \
      "$name" "$why" >> "$WORK/steps.jsonl"
    summarize; return
  fi
  echo "== [$name] start $(date -u +%T), limit ${limit}s: $*"
  local s=$(date +%s)
  if declare -F "$1" >/dev/null; then   # a function of this script: run it in a child bash
    export -f "$1"
    timeout -s INT -k 15 "$limit" bash -c '"$@"' _ "$@"
  else
    timeout -s INT -k 15 "$limit" "$@"
  fi
  local rc=$?
  local dt=$(( $(date +%s) - s )) status=ok
  # 124: the limit's SIGINT ended it; 137: SIGKILL after it; 130: it stopped on the SIGINT itself
  if (( rc == 124 || rc == 137 || (rc == 130 && dt >= limit) )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
  echo "== [$name] $status (rc $rc) after ${dt}s"
  "$PY" -c 'import json, sys; print(json.dumps(dict(name=sys.argv[1], status=sys.argv[2], rc=int(sys.argv[3]),
seconds=int(sys.argv[4]), limit_s=int(sys.argv[5]), note=sys.argv[6])))' \
    "$name" "$status" "$rc" "$dt" "$limit" "$note" >> "$WORK/steps.jsonl"
  summarize
}

# a step's limit: GPU_LIMIT_<KEY> or the default, times the time scale
lim() { local v="GPU_LIMIT_$1"; scaled "${!v:-$2}"; }
# Python with SIGINT as KeyboardInterrupt even when this script was started with SIGINT ignored
# (a time limit's SIGINT must reach pytest so that it writes its JUnit file)
PYTEST=("$PY" -c 'import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))')

# ---- setup: the offline bundle into a private target folder ---------------------------------------
install_bundle() {
  if ! ls "$BUNDLE"/*.whl >/dev/null 2>&1; then
    echo "no bundle at $BUNDLE: using what is installed (megatron-core, deepspeed, compressed-tensors must be there)"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$BUNDLE"/*.whl || return 1
  ls "$SITE" | grep -i dist-info
}
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
run_step setup "$(lim SETUP $( (( REHEARSE )) && echo 120 || echo 40))" "bundle $BUNDLE -> $SITE (--no-deps --no-index)" install_bundle

# ---- env: device, driver, versions, SDPA's backend, imports ------------------------------------------
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
  --format=csv 2>/dev/null
run_step env "$(lim ENV $( (( REHEARSE )) && echo 300 || echo 40))" "device, driver, versions, SDPA backend, imports" \
  "$PY" tools/gpu/env_report.py --output-json "$WORK/env.json" --bundle "$BUNDLE"

if (( REHEARSE )); then
  # ---- every kernel compiled ahead of time for sm_90 by this triton (no GPU needed) ---------------
  run_step aot_sm90 "$(lim AOT 1500)" "tests/ops *::test_kernels_compile_for_sm90 (flash + row softmax)" \
    "${PYTEST[@]}" -q -p no:cacheprovider \
      tests/ops/test_flash_attention.py::test_kernels_compile_for_sm90 \
      tests/ops/test_row_softmax.py::test_kernels_compile_for_sm90
fi

# ---- attention benchmark: the headline shapes first ---------------------------------------------------
ATTN_METHODS=(sdpa_vanilla mcore_offbyone outeff_softmax1 outeff_learnable outeff_gated outeff_clipped)
if (( REHEARSE )); then
  ATTN_METHODS+=(outeff_clipped_triton)   # on CPU outeff_clipped is the CPU path: rehearse the Triton one too
  ATTN_ARGS=(--interpret --sq 64 128 --d 64 128 --dtype bf16 --b 1 --h 2 --warmup 0 --repeats 1 --no-memory)
else
  ATTN_ARGS=(--sq 4096 16384 2048 8192 --d 128 64 --dtype bf16 --warmup 3 --repeats 10)
fi
run_step bench_attention "$(lim ATTN $( (( REHEARSE )) && echo 900 || echo 110))" "tools/bench_attention.py ${ATTN_ARGS[*]}" \
  "$PY" tools/bench_attention.py "${ATTN_ARGS[@]}" --methods "${ATTN_METHODS[@]}" \
    --output-json "$OUT/bench_attention.json" --output-md "$WORK/1_bench_attention.md"

# ---- training throughput ---------------------------------------------------------------------------
if (( REHEARSE )); then
  TRAIN_ARGS=(--steps 2 --warmup 1 --seq 64 --micro-batch 2)
else
  TRAIN_ARGS=(--steps 15 --warmup 3)   # OPT-125m, seq 2048, micro-batch 8, bf16, ZeRO-1
fi
run_step bench_train "$(lim TRAIN $( (( REHEARSE )) && echo 1200 || echo 90))" "tools/bench_train.py ${TRAIN_ARGS[*]}" \
  "$PY" tools/bench_train.py "${TRAIN_ARGS[@]}" --output-json "$OUT/bench_train.json" --output-md "$WORK/2_bench_train.md"

# ---- the kernel tests on the GPU ---------------------------------------------------------------------
SELECT=()
if (( REHEARSE )); then
  # the whole ops suite under the interpreter (~3-10 min on a quiet 2-core CPU; the gpu-marked tests
  # are skipped there); GPU_REHEARSE_TESTS_K="expr" rehearses a -k selection instead
  K="${GPU_REHEARSE_TESTS_K-}"
  [[ -n "$K" ]] && SELECT=(-k "$K")
elif "$PY" -c 'import xdist' 2>/dev/null; then
  SELECT=(-n "${GPU_TEST_WORKERS:-12}")   # Triton compiles in parallel across the workers
fi
run_step tests "$(lim TESTS $( (( REHEARSE )) && echo 2400 || echo 120))" "pytest tests/ops -m 'not slow' ${SELECT[*]}" \
  "${PYTEST[@]}" tests/ops -m "not slow" -q -p no:cacheprovider "${SELECT[@]}" --junitxml "$OUT/tests.xml"

# ---- the science experiment's GPU configuration -----------------------------------------------------
# The experiment resumes finished arms and writes each arm's result.json when the arm is done, so a
# run cut by its limit still leaves the finished arms; its small files are packed AFTER the step
# returns (cut or not), from the scratch folder, which lives until the end of this script.
EXP_SET=()
EXP_LIMIT="$(lim EXPERIMENT $( (( REHEARSE )) && echo 900 || echo 150))"
if (( REHEARSE )); then   # the science tests' tiny size: the config's .rehearsal overrides, one per line
  rehearsal="${EXP_CFG%.yaml}.rehearsal"
  if [[ -f "$rehearsal" ]]; then
    while IFS= read -r s; do
      [[ -z "${s// }" || "$s" =~ ^[[:space:]]*# ]] || EXP_SET+=(--set "$s")
    done < "$rehearsal"
  fi
else   # train until the step's limit, less ~70 s for start-up and the evaluation (the runs are time-limited)
  left=$(( BUDGET - ($(date +%s) - T0) - 10 )); (( left < EXP_LIMIT )) && EXP_LIMIT=$left
  EXP_SET+=(--set "time_limit_s=$(( EXP_LIMIT > 100 ? EXP_LIMIT - 70 : EXP_LIMIT * 3 / 10 + 1 ))")
fi
pack_experiment() {   # small result files only (logs, JSON, tables, plots; no checkpoints), one archive
  [[ -d "$WORK/experiment" ]] || return 0
  (cd "$WORK" && find experiment -type f -size -4M -not -path '*/checkpoints/*' -print0 \
    | tar --null -czf "$OUT/experiment.tar.gz" -T -) && echo "   packed $(tar -tzf "$OUT/experiment.tar.gz" | wc -l) files into experiment.tar.gz"
}
if [[ -f tools/run_experiment.py && -f "$EXP_CFG" ]]; then
  mkdir -p "$WORK/experiment"
  run_step experiment "$EXP_LIMIT" \
    "tools/run_experiment.py --config $EXP_CFG$( (( REHEARSE )) && echo ' (tiny --set overrides)')" \
    "$PY" tools/run_experiment.py --config "$EXP_CFG" --output-dir "$WORK/experiment" "${EXP_SET[@]}"
  pack_experiment
else
  echo "== [experiment] not present: tools/run_experiment.py or $EXP_CFG missing on this branch"
  printf '{"name": "experiment", "status": "skipped", "rc": null, "seconds": 0, "limit_s": 0, "note": "not present: tools/run_experiment.py or %s missing"}\n' \
    "$EXP_CFG" >> "$WORK/steps.jsonl"
  summarize
fi

# ---- the summary (already current after each step) ------------------------------------------------
summarize
n=$(find "$OUT" -type f | wc -l)
echo "== done in $(( $(date +%s) - T0 ))s; $n files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
(( n <= 8 )) || echo "!! more than 8 files in OUT_DIR: only 8 come back from the GPU machine"
"$PY" - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("steps: " + ", ".join(f"{k} {v.get('status')}" for k, v in s["steps"].items()))
t = s["tests"]
print("tests: " + ("no report" if t is None else f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"))
print(f"SDPA backend: {s.get('sdpa_backend')}")
for k, v in s["targets"].items():
    met = {True: "MET", False: "NOT MET", None: "-"}[v["met"]]
    print(f"  {met:7s} {k}: {v['value']} ({v['op']} {v['goal']})")
PY
failed=$(grep -c '"status": "\(failed\|timeout\)"' "$WORK/steps.jsonl" || true)
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
rm -rf "$WORK"
(( failed == 0 ))
