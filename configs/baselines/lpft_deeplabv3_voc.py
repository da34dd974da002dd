# Baseline LP-FT, stage 2: FT of everything, starting from the LP checkpoint (stage 1 is
# lp_deeplabv3_voc.py). A separate run, not an unfreeze: mmengine builds the optimizer once and
# leaves out parameters frozen at that time. The runs:
#   python tools/train.py configs/baselines/lp_deeplabv3_voc.py
#   python tools/train.py configs/baselines/lpft_deeplabv3_voc.py \
#       --cfg-options load_from=work_dirs/lp_deeplabv3_voc/iter_<N>.pth
_base_ = ['./ft_deeplabv3_voc.py']
load_from = 'work_dirs/lp_deeplabv3_voc/iter_20000.pth'
