# CamVid day -> dusk for detection: boxes DERIVED FROM THE SEMANTIC LABEL MAPS (connected regions of
# car, pedestrian, bicyclist; daft_mm/mm/datasets/camvid_boxes.py), not instance annotations, on
# the day/dusk split of the segmentation task, read by mmdet's CocoDataset and scored by its
# CocoMetric. Data, schedule and the comparison's task; the detector is the config's that
# inherits this (compare_camvid_boxes_day_dusk.py: RetinaNet; ..._faster-rcnn.py).
#   python -m daft_mm.mm.datasets.camvid_splits data/CamVid   # the day/dusk split lists
#   python -m daft_mm.mm.datasets.camvid_boxes data/CamVid    # their boxes (COCO json)
_base_ = ['mmdet::_base_/default_runtime.py']
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)
classes = ('Car', 'Pedestrian', 'Bicyclist')  # daft_mm.mm.datasets.camvid_boxes
data_root = 'data/CamVid/'
scale = (240, 180)  # 360x480 frames at 1/2 (320x240 costs 3x per iteration with batch 8)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=scale, ratio_range=(0.8, 1.25), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),  # the photometric augmentation of the segmentation task
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def _set(split, pipeline, filter_empty=False):
    return dict(type='CocoDataset', data_root=data_root, metainfo=dict(classes=classes),
                ann_file=f'daft_splits/boxes_{split}.json', data_prefix=dict(img=''),
                filter_cfg=dict(filter_empty_gt=filter_empty, min_size=1), pipeline=pipeline)


train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=_set('id_train', train_pipeline, filter_empty=True))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=_set('id_val', test_pipeline))
test_dataloader = dict(val_dataloader, dataset=_set('id_test', test_pipeline))
# each set's own annotation file is given to the metric by the comparison
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'daft_splits/boxes_id_val.json',
                     metric='bbox')
test_evaluator = dict(val_evaluator, ann_file=data_root + 'daft_splits/boxes_id_test.json')
del _set

train_cfg = dict(type='IterBasedTrainLoop', max_iters=4000, val_interval=500)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper',
                     optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001),
                     clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, by_epoch=False)]
default_hooks = dict(logger=dict(interval=25), checkpoint=dict(by_epoch=False, interval=4000))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)

compare = dict(
    name='camvid_boxes_day_dusk',
    description='CamVid boxes derived from the semantic label maps (car, pedestrian, bicyclist): '
                'train on the daytime drives 0006R0 + 0016E5, choose on the first stretch of '
                '0016E5, test on the unseen daytime drive Seq05VD (ID) and the dusk drive 0001TP '
                '(OOD); backbone pretrained on Imagenette',
    # relative to the config given to tools/compare.py (configs/camvid/*.py)
    backbone='../../benchmarks/pretrained/imagenette_resnetv1c18w16_64px.pth',
    ood=dict(dusk=dict(ann_file='daft_splits/boxes_ood_dusk.json')),
    corruptions=(('gaussian_noise', 3), ('motion_blur', 3), ('fog', 3)),
    # FT (Faster R-CNN, lr 0.01, seed 0) scores 12.4 ID-val mAP at 4000 iterations and 12.7 at
    # 6000 (benchmarks/results/camvid_boxes_levelling_hint*.json; rule set before: 6000 only if
    # more than 1 mAP above 4000): 4000 is the budget, and the budget check (FT at 8000 on every
    # seed) says whether it holds. Detection needs far more steps than segmentation's 1200
    budget=4000,
    seeds=(0, 1, 2, 3, 4),
    headline='dusk',
    # the image-blind floor as a row: the training set's typical boxes on every image
    floor=True,
    # the search grids are the segmentation tasks' (FT: 0.01 .. 2.56) times this: FT's
    # 0.000625 .. 0.16 centres on the LR Faster R-CNN trains well at here (0.01 at batch 4, as
    # 0.02 at batch 8 did at 320x240; mmdet's own: 0.02 at batch 16)
    lr_scale=0.0625,
)
