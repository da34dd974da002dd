# DAFT fine-tuning of Mask R-CNN (ResNet-50 FPN) on Cityscapes: the stock mmdet config + the
# detection DAFT fragment. DAFTHook converts BN and starts the RoI predictors (bbox fc_cls /
# fc_reg and the mask head's conv_logits) at zero, at 10x the backbone's LR; the RPN keeps its
# init. BN trains (daft_backbone: SyncBN, norm_eval=False, frozen_stages=-1).
_base_ = [
    'mmdet::cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py',
    '../_base_/daft_detection.py',
]
model = dict(backbone=_base_.daft_backbone)
