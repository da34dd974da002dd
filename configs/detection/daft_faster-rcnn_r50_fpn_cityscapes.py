# DAFT fine-tuning of Faster R-CNN (ResNet-50 FPN): the stock mmdet config + the detection DAFT
# fragment, with the stock model (no wrapper): DAFTHook alone converts BN and zeroes the ROI
# predictors. BN trains (norm_eval=False), as DAFT requires.
_base_ = [
    'mmdet::cityscapes/faster-rcnn_r50_fpn_1x_cityscapes.py',
    '../_base_/daft_detection.py',
]
model = dict(
    backbone=dict(norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False))
optim_wrapper = dict(paramwise_cfg={{_base_.daft_paramwise_cfg}})
