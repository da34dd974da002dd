# Baseline FT of Faster R-CNN (ResNet-50 FPN): the stock mmdet recipe with BatchNorm in train mode
# (stock detection configs freeze BN with norm_eval=True and the stem + stage 1 with
# frozen_stages=1; FT and DAFT both train all of it). SyncBN pools
# the small per-GPU detection batches; a single-process run reverts it to BN.
_base_ = ['mmdet::cityscapes/faster-rcnn_r50_fpn_1x_cityscapes.py']
model = dict(
    backbone=dict(
        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False, frozen_stages=-1))
