# DAFT fine-tuning of Faster R-CNN (ResNet-50 FPN): the stock mmdet config + the detection DAFT
# fragment, with the stock model (no wrapper): DAFTHook alone converts BN and zeroes the ROI
# predictors. BN trains (daft_backbone: SyncBN, norm_eval=False, frozen_stages=-1), as DAFT
# requires.
_base_ = [
    'mmdet::cityscapes/faster-rcnn_r50_fpn_1x_cityscapes.py',
    '../_base_/daft_detection.py',
]
model = dict(backbone=_base_.daft_backbone)
