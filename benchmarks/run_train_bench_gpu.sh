#!/usr/bin/env bash
# Training throughput on one GPU (issue 11's measurement matrix): a ~1B dense Transfusion
# model and a MoE one of the same active size, bf16 vs FP8 (Transformer Engine), attention
# backends sdpa / flex / triton, MoE token dispatch megatron / triton. Each row runs
# `megafusion bench` and writes benchmarks/results/train/<row>.json; the last command prints
# the Markdown table for the README.
#
#   bash benchmarks/run_train_bench_gpu.sh                 # all rows, 20 timed steps each
#   STEPS=10 WARMUP=3 bash benchmarks/run_train_bench_gpu.sh dense_bf16_sdpa moe_bf16_triton_dispatch
#
# Needs a CUDA torch, megatron-core 0.19.2 importable (the lent GPU machines have none:
# benchmarks/gpu_check.sh installs it from the carried .gpu_wheels/ and runs the bf16 rows of
# this matrix, time-boxed, with its other GPU steps) and, for the te_* / fp8_* rows,
# Transformer Engine (rows are skipped with a message without it).
# Rows run one after another, so each has the GPU to itself.
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
PROFILE_STEPS=${PROFILE_STEPS:-3}
OUT=${OUT:-benchmarks/results/train}
DENSE=examples/configs/bench_transfusion_1b.yaml
MOE=examples/configs/bench_transfusion_moe.yaml
mkdir -p "$OUT"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
python -c "import megatron.core" 2>/dev/null || {
    echo "megatron-core is not importable: pip install --no-deps megatron-core==0.19.2 (on a lent GPU" \
         "machine: pip install --no-deps --no-index .gpu_wheels/*.whl, see benchmarks/gpu_check.sh)" >&2; exit 1; }
HAVE_TE=0
python -c "import transformer_engine.pytorch" 2>/dev/null && HAVE_TE=1

ONLY=("$@")
wanted() { [ ${#ONLY[@]} -eq 0 ] && return 0; for r in "${ONLY[@]}"; do [ "$r" = "$1" ] && return 0; done; return 1; }

# row NAME NEEDS_TE CONFIG [--set KEY=VALUE ...]
row() {
    local name=$1 needs_te=$2 config=$3; shift 3
    wanted "$name" || return 0
    if [ "$needs_te" = te ] && [ "$HAVE_TE" = 0 ]; then
        echo "== $name: skipped (needs Transformer Engine: pip install 'transformer-engine[pytorch]')"; return 0
    fi
    echo "== $name"
    python -m megafusion.bench "$config" "$@" --steps "$STEPS" --warmup "$WARMUP" \
        --profile-steps "$PROFILE_STEPS" --out "$OUT/$name.json"
}

# ---- dense ~1B, bf16, megatron's local spec: the three attention backends
row dense_bf16_sdpa      -  $DENSE --set model.attention=sdpa
row dense_bf16_flex      -  $DENSE --set model.attention=flex
row dense_bf16_triton    -  $DENSE --set model.attention=triton
# ---- dense ~1B, Transformer Engine spec: bf16 baseline, then FP8 (same attention)
row dense_te_bf16_triton          te $DENSE --set model.spec=te --set model.attention=triton
row dense_te_fp8_delayed_triton   te $DENSE --set model.spec=te --set model.attention=triton --set train.fp8=delayed
row dense_te_fp8_tensorwise_triton te $DENSE --set model.spec=te --set model.attention=triton --set train.fp8=tensorwise
row dense_te_fp8_delayed_params_triton te $DENSE --set model.spec=te --set model.attention=triton --set train.fp8=delayed --set train.fp8_params=true --set parallel.distributed_optimizer=true
row dense_te_bf16_sdpa            te $DENSE --set model.spec=te --set model.attention=sdpa
row dense_te_fp8_delayed_sdpa     te $DENSE --set model.spec=te --set model.attention=sdpa --set train.fp8=delayed
# ---- MoE (0.9B active / 2.0B total), bf16: token dispatch megatron vs triton
row moe_bf16_megatron_dispatch  -  $MOE --set model.attention=triton --set model.moe.dispatch=megatron
row moe_bf16_triton_dispatch    -  $MOE --set model.attention=triton --set model.moe.dispatch=triton
row moe_bf16_sdpa_megatron_dispatch - $MOE --set model.attention=sdpa --set model.moe.dispatch=megatron
# ---- MoE, Transformer Engine spec: bf16 vs FP8
row moe_te_bf16_triton_dispatch         te $MOE --set model.spec=te --set model.attention=triton --set model.moe.dispatch=triton
row moe_te_fp8_delayed_triton_dispatch  te $MOE --set model.spec=te --set model.attention=triton --set model.moe.dispatch=triton --set train.fp8=delayed

python -m megafusion.bench --summarize "$OUT"/*.json
