# Baseline FT of RetinaNet (ResNet-50 FPN): the stock recipe with BatchNorm in train mode and every
# stage trained, as in the DAFT config (stock mmdet freezes BN and the stem + stage 1). SyncBN pools
# the small per-GPU detection batches; a single-process run reverts it to BN.
_base_ = ['./_base_/retinanet_r50_fpn_1x_cityscapes.py']
model = dict(
    backbone=dict(
        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False, frozen_stages=-1))
