# ACDC (Adverse Conditions Dataset with Correspondences, Sakaridis et al. 2021) as a test set for a
# model trained on Cityscapes: same 19 classes, labels in Cityscapes train ids. Inherited by
# configs/ood/acdc_{fog,night,rain,snow,all}.py, which pick the condition(s).
#
# Layout: unzip rgb_anon_trainvaltest.zip and gt_trainval.zip (from the ACDC website, after
# registration) into one folder, data/acdc/ by default (else --cfg-options data_root=/path/to/acdc):
#
#   data/acdc/
#     rgb_anon/{fog,night,rain,snow}/{train,val,test}/GOPRxxxx/GOPRxxxx_frame_xxxxxx_rgb_anon.png
#     gt/{fog,night,rain,snow}/{train,val}/GOPRxxxx/GOPRxxxx_frame_xxxxxx_gt_labelTrainIds.png
#
# (rgb_anon/*/{train,val,test}_ref/ hold the clear-weather reference frames: not used.) The val
# split is used: test labels are withheld for the online benchmark. The model is the stock mmseg
# DeepLabV3-R50 Cityscapes config that configs/daft_deeplabv3_cityscapes.py and the baselines
# fine-tune; their checkpoints keep the stock keys and load here. For another Cityscapes model,
# copy a config and change `_base_`. E.g.
#   python tools/test.py configs/ood/acdc_fog.py work_dirs/daft_deeplabv3_cityscapes/iter_40000.pth
#   python tools/test_robustness.py configs/ood/acdc_all.py CKPT --corruptions noise
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py']
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)

data_root = 'data/acdc/'
# ACDC frames are 1920x1080: evaluated at their own resolution, as Cityscapes at 2048x1024.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1920, 1080), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
acdc_val = dict(
    type='CityscapesDataset',
    data_root=data_root,
    data_prefix=dict(img_path='rgb_anon/fog/val', seg_map_path='gt/fog/val'),
    img_suffix='_rgb_anon.png',
    seg_map_suffix='_gt_labelTrainIds.png',
    pipeline=test_pipeline)
test_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=acdc_val)
val_dataloader = test_dataloader
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
val_evaluator = test_evaluator
