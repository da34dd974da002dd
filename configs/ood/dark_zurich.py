# Cityscapes -> Dark Zurich (Sakaridis et al. 2019), night-time val split (50 annotated images),
# the same 19 classes in Cityscapes train ids.
#
# Layout: unzip Dark_Zurich_val_anon.zip (from the Dark Zurich website) into data/dark_zurich/
# (else --cfg-options data_root=/path/to/dark_zurich):
#
#   data/dark_zurich/
#     rgb_anon/val/night/GOPR0356/GOPR0356_frame_xxxxxx_rgb_anon.png
#     gt/val/night/GOPR0356/GOPR0356_frame_xxxxxx_gt_labelTrainIds.png
#
# (rgb_anon/val_ref/day/ holds the daytime reference frames: not used; the test split's labels
# are withheld for the online benchmark.) mmseg's DarkZurichDataset reads it (the Cityscapes
# dataset with the _rgb_anon.png / _gt_labelTrainIds.png suffixes). The model is the stock mmseg
# DeepLabV3-R50 Cityscapes config, which the DAFT and baseline configs fine-tune; their
# checkpoints load here. E.g.
#   python tools/test.py configs/ood/dark_zurich.py work_dirs/daft_deeplabv3_cityscapes/iter_40000.pth
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py']
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)

data_root = 'data/dark_zurich/'
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1920, 1080), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='DarkZurichDataset',
        data_root=data_root,
        data_prefix=dict(img_path='rgb_anon/val/night', seg_map_path='gt/val/night'),
        pipeline=test_pipeline))
val_dataloader = test_dataloader
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
val_evaluator = test_evaluator
