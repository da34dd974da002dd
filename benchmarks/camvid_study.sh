#!/usr/bin/env bash
# The CamVid day -> dusk study (issue 29), resumable: every trial is cached in the work dirs, so a
# stopped run continues where it stopped (run it again with the same code). On 2 CPU cores it is
# several hours; run it in the background early in a session.
#
#   bash benchmarks/camvid_study.sh [DATA_ROOT] [WORK_ROOT]     # default data/CamVid, work_dirs
#
# 1. the comparison: every row searched on ID-val with successive halving, 5 seeds, FT at twice
#    the budget (the budget check), the dusk headline with its bootstrap, the image-blind floor;
# 2. FT and DAFT at those choices, trained from the second pretraining run (seed-1 backbone), and
#    DAFT w/o conversion at DAFT's own choice and conversion only at FT's (controlled rows);
# 3. the reports published under benchmarks/results/ (camvid.*, camvid_backbone_seed1.*,
#    camvid_ablation_at_daft_choice.*, camvid_conversion_at_ft_lr.*), the 600-iteration study's
#    kept as camvid_600it.*, camvid_backbone_seed1_600it.*.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${1:-data/CamVid}
WORK=${2:-work_dirs}
PY=${PYTHON:-.venv/bin/python}
[ -f "$DATA/daft_splits/id_val.txt" ] || "$PY" -m daft_mm.mm.datasets.camvid_splits "$DATA"
"$PY" tools/compare.py configs/camvid/compare_camvid_day_dusk.py --search \
    --work-dir "$WORK/camvid_study" --cfg-options data_root="$DATA"
"$PY" tools/compare.py configs/camvid/compare_camvid_day_dusk.py \
    --recorded "$WORK/camvid_study/search.json" --rows FT DAFT \
    --backbone benchmarks/pretrained/imagenette_resnetv1c18w16_64px_seed1.pth \
    --work-dir "$WORK/camvid_study_backbone_seed1" --cfg-options data_root="$DATA"
# shared: at_choice (a row at another row's ID-val choice, the study's runs linked)
source benchmarks/study_lib.sh
CFG=configs/camvid/compare_camvid_day_dusk.py
# DAFT w/o conversion at DAFT's setting (the searched row chose its own LR): 5 runs train;
# conversion only at FT's LR (a finalist of its own search): nothing trains
at_choice $CFG "$WORK/camvid_study" camvid_ablation_at_daft_choice "DAFT w/o conversion" DAFT \
    FT DAFT
at_choice $CFG "$WORK/camvid_study" camvid_conversion_at_ft_lr "conversion only" FT \
    FT conversion_only
if [ ! -f benchmarks/results/camvid_600it.json ]; then  # the study before, at 600 iterations
  for name in camvid camvid_backbone_seed1; do
    for ext in json md png; do
      git mv "benchmarks/results/$name.$ext" "benchmarks/results/${name}_600it.$ext"
    done
    sed -i "s/]($name\.png)/](${name}_600it.png)/; s/^!\[$name\]/![${name}_600it]/" \
        "benchmarks/results/${name}_600it.md"
  done
fi
"$PY" benchmarks/publish_report.py "$WORK/camvid_study" camvid
"$PY" benchmarks/publish_report.py "$WORK/camvid_study_backbone_seed1" camvid_backbone_seed1
for name in camvid_ablation_at_daft_choice camvid_conversion_at_ft_lr; do
  "$PY" benchmarks/publish_report.py "$WORK/$name" "$name"
done
