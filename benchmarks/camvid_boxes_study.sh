#!/usr/bin/env bash
# The CamVid day -> dusk detection study (issue 30), resumable: every trial is cached in the work
# dir, so a stopped run continues where it stopped (run it again with the same code). Faster
# R-CNN on boxes derived from the label maps, 5 seeds, budget 4000 (FT checked at 8000), then FT
# and DAFT at those choices from the second pretraining run (seed-1 backbone). About 290,000
# iterations at 1.38 s each on one core (benchmarks/results/detection_step.json): some 110
# core-hours, far more than a session; docs/compare.md has cheaper variants' measured costs.
#
#   bash benchmarks/camvid_boxes_study.sh [DATA_ROOT] [WORK_ROOT]   # default data/CamVid, work_dirs
#
# Publishes benchmarks/results/camvid_boxes.{json,md,png} and camvid_boxes_backbone_seed1.*.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${1:-data/CamVid}
WORK=${2:-work_dirs}
PY=${PYTHON:-.venv/bin/python}
[ -f "$DATA/daft_splits/id_val.txt" ] || "$PY" -m daft_mm.mm.datasets.camvid_splits "$DATA"
[ -f "$DATA/daft_splits/boxes_id_val.json" ] || "$PY" -m daft_mm.mm.datasets.camvid_boxes "$DATA"
"$PY" tools/compare.py configs/camvid/compare_camvid_boxes_day_dusk_faster-rcnn.py --search \
    --work-dir "$WORK/camvid_boxes_study" --cfg-options data_root="$DATA"
"$PY" tools/compare.py configs/camvid/compare_camvid_boxes_day_dusk_faster-rcnn.py \
    --recorded "$WORK/camvid_boxes_study/search.json" --rows FT DAFT \
    --backbone benchmarks/pretrained/imagenette_resnetv1c18w16_64px_seed1.pth \
    --work-dir "$WORK/camvid_boxes_study_backbone_seed1" --cfg-options data_root="$DATA"
"$PY" benchmarks/publish_report.py "$WORK/camvid_boxes_study" camvid_boxes
"$PY" benchmarks/publish_report.py "$WORK/camvid_boxes_study_backbone_seed1" \
    camvid_boxes_backbone_seed1
