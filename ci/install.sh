#!/usr/bin/env bash
# Installs megafusion and its dependencies in the order that works on a CPU-only machine
# with Python 3.11 (see README, "Install"). Safe to re-run: satisfied packages are skipped.
#
#   bash ci/install.sh          # runtime only
#   bash ci/install.sh --dev    # + test and benchmark tools, PyAV, DALI (CPU decoding),
#                               #   transformers / diffusers (RAE / VAE encoders)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    *) echo "ci/install.sh: unknown option '$arg' (expected --dev)" >&2; exit 2 ;;
  esac
done

echo "[install] 1/5 torch"
# torch first: an unpinned torch requirement pulls several GB of CUDA wheels on a CPU machine.
# A torch that is already installed (a user's CUDA build, say) is kept as it is.
if ! $PY -c "import torch" 2>/dev/null; then
  $PIP "torch==2.13.0"
fi
TORCH_PIN="torch==$($PY -c 'import torch; print(torch.__version__)')"
$PY -c "import torch; print('[install] torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"

echo "[install] 2/5 runtime dependencies"
# Every later install is constrained to the torch we have, so nothing can replace it.
CONSTRAINTS=$(mktemp)
echo "$TORCH_PIN" > "$CONSTRAINTS"
$PIP -c "$CONSTRAINTS" numpy "packaging>=24.2" psutil sentencepiece tokenizers tensorboard PyYAML tqdm \
  safetensors matplotlib Pillow
# The CPU torch wheel declares no triton; the CUDA build brings its own.
if ! $PY -c "import triton" 2>/dev/null; then
  $PIP -c "$CONSTRAINTS" "triton==3.7.1"
fi

echo "[install] 3/5 megatron-core 0.19.2"
# megatron-core declares Requires-Python >=3.12, but its cp311 wheel works on 3.11;
# --no-deps keeps pip from trying to build numpy from source.
$PIP --no-deps --ignore-requires-python "megatron-core==0.19.2"

if [ "$dev" = 1 ]; then
  echo "[install] 4/5 dev tools"
  $PIP -c "$CONSTRAINTS" pytest pytest-benchmark av transformers diffusers nvidia-dali-cuda130 \
    "megatron-energon==7.4.1"
else
  echo "[install] 4/5 dev tools (skipped, pass --dev)"
fi

echo "[install] 5/5 megafusion (editable)"
$PIP --no-deps -e .
$PY -c "import torch, megafusion; assert torch.__version__ == '${TORCH_PIN#torch==}', 'torch was replaced'; print('[install] done: megafusion', megafusion.__version__)"
