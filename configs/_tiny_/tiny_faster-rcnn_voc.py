# Tiny Faster R-CNN (ResNet-18 at 1/4 width, FPN) on a PASCAL VOC 2012-layout dataset, e.g. the
# synthetic one from
#   python -m daft_mm.mm.datasets data/synthetic --which voc
# data_root is the VOCdevkit folder (mmdet convention); train on ImageSets/Main/trainval.txt,
# evaluate on ImageSets/Main/test.txt. Iteration-based like the tiny segmentation configs.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/voc0712.py',
    'mmdet::_base_/default_runtime.py',
]
data_root = 'data/synthetic/VOCdevkit/'

model = dict(
    backbone=dict(
        depth=18,
        base_channels=16,  # stock 64 -> stage widths 16, 32, 64, 128
        # From scratch (no downloads): train every stage and the BN statistics.
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=20)),
    # Fewer samples / proposals: a 96x128 image holds a handful of objects.
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=200, max_per_img=100),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(max_per_img=20)))

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        # One VOC2012-layout set instead of the stock RepeatDataset(VOC2007 + VOC2012).
        _delete_=True,
        type='VOCDataset',
        data_root=data_root,
        ann_file='VOC2012/ImageSets/Main/trainval.txt',
        data_prefix=dict(sub_data_root='VOC2012/'),
        # Stock bbox_min_size=32 would ignore most objects of 96x128 images.
        filter_cfg=dict(filter_empty_gt=True, min_size=32, bbox_min_size=4),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        ann_file='VOC2012/ImageSets/Main/test.txt',
        data_prefix=dict(sub_data_root='VOC2012/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
# VOC2012 convention: area under the PR curve (VOC2007 used 11 points).
val_evaluator = dict(type='VOCMetric', metric='mAP', eval_mode='area')
test_evaluator = val_evaluator

# Synthetic VOC, 16 train / 8 test images: mAP 0.87 after these 300 iterations (~1 min on CPU).
max_iters = 300
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=100)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[250], gamma=0.1),
]
# Gradient clipping is what makes from-scratch training work here: without it the early, large
# gradients kill the ReLUs of the RoI head's shared FCs and every box gets the same score (mAP 0).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=10, norm_type=2))
# visualization.interval=1: `tools/test.py --show-dir` paints every one of the few test images.
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=100),
    visualization=dict(interval=1))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
# DDP with device_ids=None, so that CPU multi-process runs work (see tiny_seg_runtime.py).
model_wrapper_cfg = dict(
    type='MMDistributedDataParallel',
    device_ids=None,
    broadcast_buffers=False,
    find_unused_parameters=False)
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=4)
