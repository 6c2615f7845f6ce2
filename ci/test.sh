#!/usr/bin/env bash
# Runs the test suite (CPU: gloo for distributed tests, Triton's interpreter for kernels).
# Extra arguments go to pytest, e.g. `bash ci/test.sh -k config`.
# Without arguments (CI) the GPU check's dry run comes first: every command that
# benchmarks/gpu_check.sh will run on a GPU machine parses and every file it reads exists
# (~20 s; then tests/test_gpu_check.py does not repeat it).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$#" -eq 0 ]; then
  GPU_CHECK_DRY=1 PYTHON=${PYTHON:-python3} bash benchmarks/gpu_check.sh
  export GPU_CHECK_DRY_DONE=1
fi
exec ${PYTHON:-python3} -m pytest -q --durations=20 --benchmark-skip "$@"
