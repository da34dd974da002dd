# DAFT fine-tuning of RetinaNet (ResNet-50 FPN), a one-stage detector: the stock recipe + the
# detection DAFT fragment. DAFTHook converts BN on the training data, then retina_cls starts at
# weight 0 and its focal-loss prior bias (p = 0.01, -4.595) and retina_reg at zero, both at 10x
# the backbone's LR. Zeroing the prior too would start the focal loss at ~100 instead of ~1.
_base_ = [
    './_base_/retinanet_r50_fpn_1x_cityscapes.py',
    '../_base_/daft_detection.py',
]
model = dict(backbone=_base_.daft_backbone)
