# RetinaNet R-50 FPN on Cityscapes (8 instance classes), the recipe mmdet ships for Faster R-CNN
# on Cityscapes (configs/cityscapes/faster-rcnn_r50_fpn_1x_cityscapes.py) applied to RetinaNet:
# mmdet has no stock RetinaNet Cityscapes config. Starts from the COCO RetinaNet (load_from); its
# 80-class classifier does not fit and is left out when loading.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/cityscapes_detection.py',
    'mmdet::_base_/default_runtime.py',
    'mmdet::_base_/schedules/schedule_1x.py',
]
model = dict(backbone=dict(init_cfg=None), bbox_head=dict(num_classes=8))

# lr for a batch size of 8 (8 GPUs x 1 image), as the stock Cityscapes detection configs
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=8, by_epoch=True, milestones=[7], gamma=0.1)
]
# actual epoch = 8 * 8 = 64 (the dataset is repeated 8 times)
train_cfg = dict(max_epochs=8)

load_from = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth'  # noqa
