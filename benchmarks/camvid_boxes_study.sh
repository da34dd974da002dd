#!/usr/bin/env bash
# The CamVid day -> dusk detection study (issue 30), resumable: every trial is cached in the work
# dirs, so a stopped run continues where it stopped (benchmarks/resume_study.sh carries the trials
# from session to session). Faster R-CNN on boxes derived from the label maps, 240x180, batch 4,
# 5 seeds, budget 4000 (configs/camvid/_base_/camvid_boxes_day_dusk.py). It is many sessions of
# 2 cores (benchmarks/results/detection_step.json), so it runs in order of what the verdict needs:
#
# 1. FT and DAFT, each searched on ID-val (successive halving, two finalists on every seed);
# 2. the controlled ablations: DAFT w/o conversion at DAFT's choice, conversion only at FT's
#    (benchmarks/study_lib.sh: what each part does at the method's own setting);
# 3. LP and LP-FT searched too, and the budget check (FT at 8000 on every seed);
# 4. FT and DAFT at their choices from the second pretraining run (seed-1 backbone);
# 5. the reports published: benchmarks/results/camvid_boxes.{json,md,png},
#    camvid_boxes_ablation_at_daft_choice.*, camvid_boxes_conversion_at_ft_lr.*,
#    camvid_boxes_backbone_seed1.*.
#
#   bash benchmarks/camvid_boxes_study.sh [DATA_ROOT] [WORK_ROOT]   # default data/CamVid, work_dirs
#   bash benchmarks/resume_study.sh benchmarks/camvid_boxes_study.sh DATA_ROOT WORK_ROOT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${1:-data/CamVid}
WORK=${2:-work_dirs}
PY=${PYTHON:-.venv/bin/python}
CFG=configs/camvid/compare_camvid_boxes_day_dusk_faster-rcnn.py
STUDY=$WORK/camvid_boxes_study
source benchmarks/study_lib.sh
[ -f "$DATA/daft_splits/id_val.txt" ] || "$PY" -m daft_mm.mm.datasets.camvid_splits "$DATA"
[ -f "$DATA/daft_splits/boxes_id_val.json" ] || "$PY" -m daft_mm.mm.datasets.camvid_boxes "$DATA"
"$PY" tools/compare.py $CFG --search --rows FT DAFT --no-budget-check --work-dir "$STUDY" \
    --cfg-options data_root="$DATA"
at_choice $CFG "$STUDY" camvid_boxes_ablation_at_daft_choice "DAFT w/o conversion" DAFT FT DAFT
at_choice $CFG "$STUDY" camvid_boxes_conversion_at_ft_lr "conversion only" FT FT
"$PY" tools/compare.py $CFG --search --rows FT LP LP-FT DAFT --work-dir "$STUDY" \
    --cfg-options data_root="$DATA"
"$PY" tools/compare.py $CFG --recorded "$STUDY/search.json" --rows FT DAFT \
    --backbone benchmarks/pretrained/imagenette_resnetv1c18w16_64px_seed1.pth \
    --work-dir "$WORK/camvid_boxes_study_backbone_seed1" --cfg-options data_root="$DATA"
for name in camvid_boxes_study:camvid_boxes camvid_boxes_ablation_at_daft_choice \
    camvid_boxes_conversion_at_ft_lr camvid_boxes_study_backbone_seed1:camvid_boxes_backbone_seed1; do
  "$PY" benchmarks/publish_report.py "$WORK/${name%%:*}" "${name##*:}"
done
