#!/usr/bin/env bash
# A real IsoFLOP study end to end on ShapesWorld (generated in-process, no download):
# plan two or more compute budgets x model sizes of a tiny Transfusion family, train every
# run, then fit per-modality (text and image) IsoFLOP curves and N_opt, D_opt ~ C^a, C^b.
#
#   bash examples/isoflop_shapes.sh [OUT_DIR] [BUDGETS] [SIZES] [FAMILY]
#
# FAMILY defaults to examples/configs/isoflop_family_shapes.yaml (text documents and
# image-caption documents mixed); isoflop_family_shapes_text.yaml and _image.yaml train one
# modality each (the per-modality sweeps of docs/results.md). Runs are trained by
# `megafusion isoflop run`: re-running the script skips finished runs and resumes a killed one.
#
# Defaults: OUT_DIR=runs/isoflop_shapes, BUDGETS=1e11,3e11, SIZES=4: 8 runs, 5850 steps,
# 12 minutes of training measured on a busy shared 2-core machine. The text curves have
# their minimum inside the grid at both budgets; the image (pixel flow-matching) loss is
# near its floor for every size at this scale, so its curves are flat and its optima noise.
# CI runs a much smaller version (tests/scaling/test_isoflop_sweep.py). Outputs: OUT_DIR/plan.json,
# OUT_DIR/configs/, OUT_DIR/runs/<run>/metrics.jsonl, and OUT_DIR/fit/scaling_laws.json
# with isoflop_{text,image}.png and optima_{text,image}.png.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/isoflop_shapes}
BUDGETS=${2:-1e11,3e11}
SIZES=${3:-4}
FAMILY=${4:-examples/configs/isoflop_family_shapes.yaml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f "$OUT/plan.json" ]; then
  megafusion isoflop plan --budgets "$BUDGETS" --family "$FAMILY" --out "$OUT" --sizes "$SIZES"
fi
megafusion isoflop run "$OUT"
# Training losses of one step are noisy (one batch, random flow times): average the last 10.
megafusion isoflop fit "$OUT"/runs/* --plan "$OUT/plan.json" --out "$OUT/fit" --average-last 10
