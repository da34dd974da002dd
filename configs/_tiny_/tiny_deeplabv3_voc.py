# Tiny DeepLabV3 on a PASCAL VOC 2012-layout dataset (JPEGImages + SegmentationClass, 21 classes),
# e.g. the synthetic one from
#   python -m daft_mm.mm.datasets data/synthetic --which voc
# Note data_root is the VOC2012 folder itself (mmseg convention), not VOCdevkit.
_base_ = [
    './_base_/deeplabv3_r18-tiny.py',
    'mmseg::_base_/datasets/pascal_voc12.py',
    './_base_/tiny_seg_runtime.py',
]
data_root = 'data/synthetic/VOCdevkit/VOC2012'
crop_size = (96, 128)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=21),
    auxiliary_head=dict(num_classes=21))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(128, 96), ratio_range=(1.0, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
img_ratios = [0.75, 1.0, 1.25]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in img_ratios],
            [
                dict(type='RandomFlip', prob=0., direction='horizontal'),
                dict(type='RandomFlip', prob=1., direction='horizontal')
            ],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
