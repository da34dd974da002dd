# Baseline LP-FT, stage 2: FT of everything, starting from the LP checkpoint (stage 1 is
# lp_deeplabv3_cityscapes.py). A separate run, not an unfreeze: mmengine builds the optimizer
# once and leaves out parameters frozen at that time. The runs:
#   python tools/train.py configs/baselines/lp_deeplabv3_cityscapes.py
#   python tools/train.py configs/baselines/lpft_deeplabv3_cityscapes.py \
#       --cfg-options load_from=work_dirs/lp_deeplabv3_cityscapes/iter_<N>.pth
_base_ = ['./ft_deeplabv3_cityscapes.py']
load_from = 'work_dirs/lp_deeplabv3_cityscapes/iter_40000.pth'
