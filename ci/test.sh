#!/usr/bin/env bash
# Runs the test suite (CPU: gloo for distributed tests, Triton's interpreter for kernels).
# Extra arguments go to pytest, e.g. `bash ci/test.sh -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec ${PYTHON:-python3} -m pytest -q --durations=20 --benchmark-skip "$@"
