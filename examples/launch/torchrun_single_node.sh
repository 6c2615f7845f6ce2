#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo when there is no GPU).
#
#   NPROC=8 bash examples/launch/torchrun_single_node.sh examples/configs/tiny_text.yaml runs/tiny \
#       --set parallel.tp=2 --set parallel.pp=2
#
# World size = NPROC; data parallelism is NPROC / (tp * pp). Re-running the same command
# resumes from the run dir's latest complete checkpoint.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG RUN_DIR [--set key=value ...]}
RUN_DIR=${2:?usage: $0 CONFIG RUN_DIR [--set key=value ...]}
shift 2
NPROC=${NPROC:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
cmd=(torchrun --standalone --nproc_per_node "$NPROC" -m megafusion.train
  --config "$CONFIG" --run-dir "$RUN_DIR" "$@")
if [ "${MEGAFUSION_DRY_RUN:-0}" = 1 ]; then  # print the command, shell-quoted; run nothing
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
mkdir -p "$RUN_DIR"
"${cmd[@]}" 2>&1 | tee -a "$RUN_DIR/train.log"
