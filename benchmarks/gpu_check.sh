#!/usr/bin/env bash
# One prepared GPU check (issue 30): every GPU test and benchmark of what has landed, in one
# command sized for < 9 minutes on one H100 (--quick: about half). See docs/kernels.md, "The GPU check".
#
#   mkdir -p .gpu_wheels && cp ../shared/wheels/gpu-py312/*.whl .gpu_wheels/   # here, once
#   bash benchmarks/gpu_check.sh [--quick]          # on the GPU machine (carry .gpu_wheels)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # on a CPU: checks every command parses (CI)
#
# Setup: installs the wheels in .gpu_wheels/ (GPU_CHECK_WHEELS) that are not installed yet with
# `pip install --no-deps --no-index` (the GPU machines reach no registry), installs this tree
# with `pip install --no-deps --no-build-isolation -e .` (megafusion_kernels exists only through
# the package mapping), then checks the imports megafusion_kernels, yaml, megatron.core.
# Steps, in order, each time-boxed (timeout) and skipped with a printed reason when what it
# needs is absent; each prints its own elapsed time:
#   1. gpu_tests   pytest -m gpu over tests/kernels, model, data, training and the benchmarks'
#                  GPU sanity tests (FP8/TE and DALI tests skip without their packages)
#   2. kernels     pytest-benchmark suites: hybrid attention (vs FlexAttention, SDPA + dense
#                  mask, causal flash), MoE permute/unpermute (vs megatron's unfused path,
#                  GB/s vs a measured device copy), grouped expert MLP (vs the per-expert loop)
#   3. train       megafusion bench: ~1B dense (attention sdpa/flex/triton) and MoE (dispatch
#                  megatron/triton), bf16, local spec: tokens/s, TFLOP/s, MFU, memory
#   4. report      benchmarks/results/gpu/<device>-<date>/*.json + tables.md, tables printed
# Exit 0 when every step ran or was skipped with a reason; 1 when one failed or hit its time box.
# Where the device tool's $OUT is set (or GPU_CHECK_OUT), the results also land there as one
# tar.gz plus the log (that tool returns at most 8 files).
#
# Environment: GPU_CHECK_DRY=1 (dry run), GPU_CHECK_BUDGET (seconds for all steps, default
# 510; --quick 270), GPU_CHECK_WHEELS (.gpu_wheels), GPU_CHECK_RESULTS (results folder),
# PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$arg' (expected --quick)" >&2; exit 2 ;;
  esac
done
DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.gpu_wheels}
if [ "$QUICK" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-270}; else BUDGET=${GPU_CHECK_BUDGET:-510}; fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
START=$(date +%s)
FAILED=0

# ------------------------------------------------------------------------- what runs
# Sizing (no GPU run yet; by FLOPs): a training step of either bench config is ~2e14 FLOPs
# (megafusion.scaling.flops, 8 x 4096 positions), ~0.5 s at 400 TFLOP/s, so a row's 10 steps
# are ~5 s and its time box is for start-up (imports, model build, Triton autotune, compiles).
# An attention case at N = 8k is ~1e12 FLOPs fwd+bwd (ms per round, 23 rounds): the box is for
# FlexAttention's compiles (one per N and pass). The budget ends the list, not the boxes.
# Step 1: where the GPU tests live (every test in them carrying the gpu marker, see tests/conftest.py)
GPU_TEST_PATHS=(tests/kernels tests/model tests/data tests/training
                benchmarks/bench_moe_dispatch.py benchmarks/bench_grouped_mlp.py)
# Step 2: pytest -k selections of the benchmark cases (ids: see each bench file's docstring),
# each starting with its test function's name so that the dry run checks all three in one go
if [ "$QUICK" = 1 ]; then
  TEST_K="not 16384"
  ATTN_K="test_hybrid_attention and N8192 and (mixed or sdpa_causal)"
  MOE_K="test_permute_unpermute and T4096 and H1024"
  MLP_K="test_grouped_mlp and T4096 and H1024"
  TRAIN_STEPS=4; TRAIN_WARMUP=2; TRAIN_PROFILE=1
  TRAIN_ROWS=(dense_bf16_triton moe_bf16_triton_dispatch)
  BOX_TESTS=60; BOX_ATTN=60; BOX_MOE=25; BOX_MLP=25; BOX_ROW=75
else
  TEST_K=""
  ATTN_K="test_hybrid_attention and (N8192 or (N16384 and fwd_bwd and (mixed or sdpa_causal)))"
  MOE_K="test_permute_unpermute and (T4096 or (T16384 and H4096))"
  MLP_K="test_grouped_mlp and (T4096 or (T16384 and H4096 and E64k8))"
  TRAIN_STEPS=6; TRAIN_WARMUP=2; TRAIN_PROFILE=1
  # most wanted first: the budget ends the list (flex compiles the whole model: slowest start)
  TRAIN_ROWS=(dense_bf16_triton moe_bf16_triton_dispatch moe_bf16_megatron_dispatch dense_bf16_sdpa dense_bf16_flex)
  BOX_TESTS=100; BOX_ATTN=110; BOX_MOE=45; BOX_MLP=40; BOX_ROW=80
fi
DENSE=examples/configs/bench_transfusion_1b.yaml
MOE=examples/configs/bench_transfusion_moe.yaml
# Step 3: row name -> config and overrides (the bf16 rows of benchmarks/run_train_bench_gpu.sh)
row_args() {
  case "$1" in
    dense_bf16_sdpa)            echo "$DENSE --set model.attention=sdpa" ;;
    dense_bf16_flex)            echo "$DENSE --set model.attention=flex" ;;
    dense_bf16_triton)          echo "$DENSE --set model.attention=triton" ;;
    moe_bf16_megatron_dispatch) echo "$MOE --set model.attention=triton --set model.moe.dispatch=megatron" ;;
    moe_bf16_triton_dispatch)   echo "$MOE --set model.attention=triton --set model.moe.dispatch=triton" ;;
    *) return 1 ;;
  esac
}
FILES_READ=(benchmarks/bench_hybrid_attention.py benchmarks/bench_moe_dispatch.py benchmarks/bench_grouped_mlp.py
            benchmarks/bench_timing.py benchmarks/gpu_check_report.py benchmarks/run_train_bench_gpu.sh
            tests/conftest.py pyproject.toml "$DENSE" "$MOE" "${GPU_TEST_PATHS[@]}")

# ------------------------------------------------------------------------- helpers
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
# record NAME STATUS SECONDS REASON
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RES/steps.tsv"
  [ "$2" = failed ] || [ "$2" = timeout ] && FAILED=1
  printf '== [%s] %s: %s (%ss)%s\n' "$(elapsed)s" "$1" "$2" "$3" "${4:+: $4}"
}
skip() { record "$1" skipped 0 "$2"; }
# boxed NAME SECONDS CMD...: runs CMD under timeout (SIGINT first, so pytest still writes its
# JSON; SIGKILL 20 s later), never past the whole budget; records ok / failed / timeout.
# With less than MIN_BOX seconds (default 10) of the budget left it is skipped instead.
boxed() {
  local name=$1 box=$2; shift 2
  local remaining; remaining=$(left)
  [ "$remaining" -lt "$box" ] && box=$remaining
  if [ "$box" -lt "${MIN_BOX:-10}" ]; then skip "$name" "${remaining}s of the ${BUDGET}s budget left"; return 0; fi
  echo "== [$(elapsed)s] $name (time box ${box}s): $*"
  local t0=$SECONDS rc
  timeout -s INT -k 20 "$box" "$@"
  rc=$?
  local took=$(( SECONDS - t0 ))
  if [ "$rc" = 0 ]; then record "$name" ok "$took" ""
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ] || { [ "$rc" = 130 ] && [ "$took" -ge "$box" ]; }; then
    record "$name" timeout "$took" "stopped at its ${box}s time box; partial results kept"
  else record "$name" failed "$took" "exit code $rc"; fi
  return 0
}
# checked NAME CMD...: dry run: CMD must succeed (quietly; its output is shown when it fails)
checked() {
  local name=$1; shift
  local t0=$SECONDS out
  if out=$("$@" 2>&1); then record "$name" checked $(( SECONDS - t0 )) ""
  else echo "$out" | tail -30; record "$name" failed $(( SECONDS - t0 )) "dry run: '$*' failed"; fi
}

# ------------------------------------------------------------------------- results folder
if [ "$DRY" = 1 ]; then
  RES=${GPU_CHECK_RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}
else
  RES=${GPU_CHECK_RESULTS:-benchmarks/results/gpu/$("$PY" benchmarks/gpu_check_report.py device)-$(date -u +%Y-%m-%d)}
fi
mkdir -p "$RES"
: > "$RES/steps.tsv"
echo "== gpu_check: results in $RES; $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU: checks commands and files)' || echo "budget ${BUDGET}s")$([ "$QUICK" = 1 ] && echo ', --quick')"

# ------------------------------------------------------------------------- setup
if [ "$DRY" != 1 ]; then
  t0=$SECONDS
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # only what is missing: the image's own pytest & co. stay as they are
    mapfile -t missing < <("$PY" - "$WHEELS" <<'EOF'
import sys, pathlib, importlib.metadata as md
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0].replace("_", "-")
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        print(whl)
EOF
)
    if [ "${#missing[@]}" -gt 0 ]; then
      echo "== setup: pip install --no-deps --no-index ${missing[*]##*/}"
      "$PY" -m pip install -q --no-deps --no-index --disable-pip-version-check "${missing[@]}" \
        || echo "== setup: installing the wheels failed (steps needing them will be skipped)"
    fi
  else
    echo "== setup: no wheels in $WHEELS/ (fill it here: mkdir -p $WHEELS && cp ../shared/wheels/gpu-py312/*.whl $WHEELS/;" \
         "then carry $WHEELS); going on with what is installed"
  fi
  if ! "$PY" -c "import megafusion, megafusion_kernels, sys; sys.exit(0 if megafusion.__file__.startswith('$PWD/') else 1)" 2>/dev/null; then
    echo "== setup: pip install --no-deps --no-build-isolation -e ."
    "$PY" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e . \
      || echo "== setup: installing megafusion failed"
  fi
  echo "== setup took $(( SECONDS - t0 ))s"
fi

# One interpreter checks every import (megafusion_kernels, yaml and megatron.core first) and
# prints "HAVE_<name>=0|1" lines for the steps below plus one line of versions.
declare -A HAVE
HAVE_GPU=0
while IFS='=' read -r key value; do
  case "$key" in
    HAVE_GPU) HAVE_GPU=$value ;;
    HAVE_*) HAVE[${key#HAVE_}]=$value ;;
    *) echo "$key${value:+=$value}" ;;
  esac
done < <("$PY" - <<'EOF' 2>/dev/null
import importlib
line = []
try:
    import torch
    gpu = torch.cuda.is_available()
    line += [f"torch {torch.__version__}", f"GPU: {torch.cuda.get_device_name() if gpu else 'none'}"]
except Exception as err:
    gpu = False
    line.append(f"torch: missing ({type(err).__name__})")
print(f"HAVE_GPU={int(gpu)}")
for mod in ("megafusion_kernels", "yaml", "megatron.core", "megafusion", "pytest", "pytest_benchmark", "triton",
            "transformer_engine"):
    try:
        m = importlib.import_module(mod)
        ok = 1
        line.append(f"{mod} {getattr(m, '__version__', 'ok')}")
    except Exception as err:
        ok = 0
        line.append(f"{mod}: NOT importable ({type(err).__name__}: {str(err)[:80]})")
    print(f"HAVE_{mod}={ok}")
print("== imports: " + "; ".join(line))
EOF
)
for mod in megafusion_kernels yaml megatron.core; do
  [ "${HAVE[$mod]:-0}" = 1 ] || echo "== imports: $mod is not importable"
done
# why a step cannot run here ("" = it can)
needs() {
  local m
  if [ "$DRY" != 1 ] && [ "$HAVE_GPU" = 0 ]; then echo "no CUDA GPU is visible"; return; fi
  for m in "$@"; do
    [ "${HAVE[$m]:-0}" = 1 ] || { echo "$m is not importable"; return; }
  done
}

# ------------------------------------------------------------------------- dry run
if [ "$DRY" = 1 ]; then
  checked "syntax (bash -n)" bash -n benchmarks/gpu_check.sh benchmarks/run_train_bench_gpu.sh
  missing_files=()
  for f in "${FILES_READ[@]}"; do [ -e "$f" ] || missing_files+=("$f"); done
  if [ ${#missing_files[@]} = 0 ]; then record "files read exist" checked 0 ""
  else record "files read exist" failed 0 "missing: ${missing_files[*]}"; fi
  checked "pip is there (setup: pip install --no-deps --no-index / -e .)" "$PY" -m pip --version
  checked "python helpers compile" "$PY" -m py_compile benchmarks/gpu_check_report.py benchmarks/bench_hybrid_attention.py \
    benchmarks/bench_moe_dispatch.py benchmarks/bench_grouped_mlp.py benchmarks/bench_timing.py
  why=$(needs megafusion_kernels yaml megatron.core pytest)
  if [ -n "$why" ]; then skip "1 gpu_tests (collect)" "$why"
  else
    # the files of GPU_TEST_PATHS that hold GPU tests (collecting every test module there takes
    # half a minute on a 2-core CI machine; CI's own test run collects them all anyway):
    # they collect, and `-m gpu -k ...` selects some
    mapfile -t gpu_files < <(grep -lE 'mark\.gpu|requires_gpu|requires_te_gpu|reason=.*(GPU|CUDA|Transformer Engine)' \
      -r --include='*.py' "${GPU_TEST_PATHS[@]}")
    checked "1 gpu_tests (collect -m gpu: ${#gpu_files[@]} files)" bash -c '"$0" -m pytest --collect-only -q \
      -p no:cacheprovider -p no:warnings -m gpu ${1:+-k "$1"} "${@:2}" | grep -q "::"' "$PY" "$TEST_K" "${gpu_files[@]}"
  fi
  why=$(needs megafusion_kernels pytest pytest_benchmark)
  if [ -n "$why" ]; then skip "2 kernels (collect)" "$why"
  else
    # the GPU cases listed on this CPU (MEGAFUSION_BENCH_GPU_CASES=1): each selection must pick some
    checked "2 kernels (collect -k, each selection picks cases)" bash -c 'out=$(MEGAFUSION_BENCH_GPU_CASES=1 "$0" -m pytest \
      --collect-only -q -p no:cacheprovider -p no:warnings -o addopts="" benchmarks/bench_hybrid_attention.py \
      benchmarks/bench_moe_dispatch.py benchmarks/bench_grouped_mlp.py -k "($1) or ($2) or ($3)") || exit 1
      for t in test_hybrid_attention test_permute_unpermute test_grouped_mlp; do
        n=$(grep -c "::$t\[" <<< "$out"); echo "$t: $n cases"; [ "$n" -gt 0 ] || exit 1; done' \
      "$PY" "$ATTN_K" "$MOE_K" "$MLP_K"
  fi
  why=$(needs megafusion yaml megatron.core)
  if [ -n "$why" ]; then skip "3 train (configs)" "$why"
  else
    # what megafusion bench does with each row's arguments before it trains (the memory guard
    # is left to the GPU machine), in one interpreter
    rows=()
    for row in "${TRAIN_ROWS[@]}"; do rows+=("$(row_args "$row") --steps $TRAIN_STEPS --warmup $TRAIN_WARMUP --profile-steps $TRAIN_PROFILE --out $RES/train_$row.json"); done
    checked "3 train: megafusion bench arguments + configs (${#TRAIN_ROWS[@]} rows)" "$PY" -c '
import shlex, sys
from megafusion.bench import bench_config, build_parser
from megafusion.config import load_config, validate
for line in sys.argv[1:]:
    a = build_parser().parse_args(shlex.split(line))
    cfg = bench_config(load_config(a.config, a.overrides), a.warmup + a.steps + 1 + a.profile_steps)
    validate(cfg, 1, check_memory=False)
' "${rows[@]}"
  fi
  checked "4 report (summary of this dry run)" "$PY" benchmarks/gpu_check_report.py summary "$RES" --dry \
    $([ "$QUICK" = 1 ] && echo --quick)
  "$PY" benchmarks/gpu_check_report.py summary "$RES" --dry $([ "$QUICK" = 1 ] && echo --quick) >/dev/null  # with step 4
  echo "== dry run done in $(elapsed)s: $([ "$FAILED" = 0 ] && echo 'every command parses, every file exists' || echo FAILED)"
  [ -z "${GPU_CHECK_RESULTS:-}" ] && rm -rf "$RES"
  exit "$FAILED"
fi

# ------------------------------------------------------------------------- 1. GPU tests
why=$(needs megafusion_kernels yaml pytest)
if [ -n "$why" ]; then skip "1 gpu_tests" "$why"
else
  paths=("${GPU_TEST_PATHS[@]}")
  [ "${HAVE[megatron.core]:-0}" = 1 ] || { paths=(tests/kernels); echo "== megatron.core missing: only tests/kernels"; }
  boxed "1 gpu_tests" "$BOX_TESTS" "$PY" -m pytest -m gpu ${TEST_K:+-k "$TEST_K"} -q -o addopts="-ra" \
    -p no:cacheprovider --junitxml "$RES/gpu_tests.xml" "${paths[@]}"
  "$PY" benchmarks/gpu_check_report.py junit-json "$RES/gpu_tests.xml" "$RES/gpu_tests.json" && rm -f "$RES/gpu_tests.xml"
fi

# ------------------------------------------------------------------------- 2. kernel benchmarks
why=$(needs megafusion_kernels pytest pytest_benchmark triton)
if [ -n "$why" ]; then skip "2 kernels" "$why"
else
  for spec in "hybrid_attention|$ATTN_K|$BOX_ATTN" "moe_dispatch|$MOE_K|$BOX_MOE" "grouped_mlp|$MLP_K|$BOX_MLP"; do
    IFS='|' read -r bench sel box <<< "$spec"
    boxed "2 kernels: $bench" "$box" "$PY" -m pytest "benchmarks/bench_$bench.py" -o addopts="" -q -p no:cacheprovider \
      --benchmark-only --benchmark-json "$RES/$bench.json" -k "$sel"
  done
fi

# ------------------------------------------------------------------------- 3. training throughput
why=$(needs megafusion yaml megatron.core)
if [ -n "$why" ]; then skip "3 train" "$why"
else
  "$PY" -c "import transformer_engine.pytorch" 2>/dev/null \
    || echo "== 3 train: Transformer Engine rows (te spec, FP8) skipped: transformer_engine is not importable here"
  for row in "${TRAIN_ROWS[@]}"; do
    read -r -a args <<< "$(row_args "$row")"
    MIN_BOX=45 boxed "3 train: $row" "$BOX_ROW" "$PY" -m megafusion.bench "${args[@]}" --steps "$TRAIN_STEPS" \
      --warmup "$TRAIN_WARMUP" --profile-steps "$TRAIN_PROFILE" --out "$RES/train_$row.json"
  done
fi

# ------------------------------------------------------------------------- 4. report
echo "== [$(elapsed)s] 4 report"
"$PY" benchmarks/gpu_check_report.py summary "$RES" $([ "$QUICK" = 1 ] && echo --quick) \
  || { echo "== report failed"; FAILED=1; }
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-}}
if [ -n "$OUT_DIR" ]; then
  mkdir -p "$OUT_DIR" && tar -czf "$OUT_DIR/gpu_check_results.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")" \
    && cp "$RES/tables.md" "$RES/summary.json" "$OUT_DIR/" && echo "== results also in $OUT_DIR/gpu_check_results.tar.gz"
fi
echo "== gpu_check done in $(elapsed)s: $([ "$FAILED" = 0 ] && echo 'every step ran or was skipped with a reason' || echo 'a step FAILED or timed out')"
exit "$FAILED"
