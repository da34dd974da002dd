# DAFT twin of ./tiny_faster-rcnn_voc.py: the same tiny model, data and schedule, with DAFT on
# (the ../_base_/daft_detection.py fragment: BN conversion on the training data, zero
# predictors, the head at daft_head_lr_mult x the base LR).
# Data: python -m daft_mm.mm.datasets data/synthetic
# DAFT converts pretrained BN layers only; the tiny backbone has no weights to download, so give
# it a checkpoint of this backbone (mmdet ResNet-18 at 1/4 width):
#   --cfg-options model.backbone.init_cfg.type=Pretrained \
#                 model.backbone.init_cfg.checkpoint=path/to/backbone.pth
# Without pretrained weights DAFTHook says so and runs integrated LP+FT alone.
_base_ = ['./tiny_faster-rcnn_voc.py', '../_base_/daft_detection.py']
# The detection fragment's backbone settings (BN trains, no frozen stage), extended in place:
# plain BN instead of the fragment's SyncBN, which a multi-process CPU run cannot use.
model = dict(backbone=dict(_base_.daft_backbone, norm_cfg=dict(type='BN', requires_grad=True)))
