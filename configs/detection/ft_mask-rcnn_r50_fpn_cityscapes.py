# Baseline FT of Mask R-CNN (ResNet-50 FPN) on Cityscapes: the stock recipe with BatchNorm in train
# mode and every stage trained, as in the DAFT config. SyncBN pools the small per-GPU detection
# batches; a single-process run reverts it to BN.
_base_ = ['mmdet::cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py']
model = dict(
    backbone=dict(
        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False, frozen_stages=-1))
