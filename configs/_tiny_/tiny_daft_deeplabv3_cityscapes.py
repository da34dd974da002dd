# DAFT twin of ./tiny_deeplabv3_cityscapes.py: the same tiny model, data and schedule, with DAFT on
# (the ../_base_/daft.py fragment: BN conversion on the training data, zero predictors, the head at
# daft_head_lr_mult x the base LR).
# Data: python -m daft_mm.mm.datasets data/synthetic
# DAFT converts pretrained BN layers only; the tiny backbone has no weights to download, so give
# it some, e.g. the one `make demo` pretrains (same backbone as the seg configs):
#   --cfg-options model.backbone.init_cfg.type=Pretrained \
#                 model.backbone.init_cfg.checkpoint=work_dirs/demo/pretrain/<key>/backbone.pth
# Without pretrained weights DAFTHook says so and runs integrated LP+FT alone.
_base_ = ['./tiny_deeplabv3_cityscapes.py', '../_base_/daft.py']
# The stock PolyLR floor (eta_min=1e-4, ./_base_/tiny_seg_runtime.py) is kept: daft-mm gives
# each param group its own floor, so the head/backbone LR ratio holds to the end.
