# What the demo configs (configs/demo/*.py) change in the real DAFT / baseline configs to run on
# 2 CPU cores in minutes: the tiny DeepLabV3 (ResNetV1c-18 at 1/4 width, the stand-in of
# configs/_tiny_), 64x128 images, BN instead of SyncBN, a short schedule. Every name here starts
# with `demo_` because mmengine forbids a key defined by two bases: the demo configs inherit this
# file next to a real config and pull the values in with {{_base_.demo_*}}.
#
# tools/demo.py (daft_mm/benchmark) sets, per run: data_root (generated data), the backbone's
# init_cfg (the pretrained backbone; every decode head is new), load_from (LP-FT: the LP stage),
# optim_wrapper.optimizer.lr, daft_head_lr_mult / daft_head_modules / model.method (DAFT and its
# ablations), train_cfg.max_iters (the equal budget), randomness.seed, work_dir.
demo_crop_size = (64, 128)
demo_norm_cfg = dict(type='BN', requires_grad=True)
demo_model = dict(
    pretrained=None,  # the benchmark's pretrained backbone comes through backbone.init_cfg
    data_preprocessor=dict(size=demo_crop_size),
    backbone=dict(depth=18, stem_channels=16, base_channels=16, norm_cfg=demo_norm_cfg),
    decode_head=dict(in_channels=128, channels=32, dilations=(1, 2, 4, 6),
                     norm_cfg=demo_norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=16, norm_cfg=demo_norm_cfg))

# No PhotoMetricDistortion: photometric shift is what the OOD sets measure.
demo_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(128, 64), ratio_range=(1.0, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=demo_crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
demo_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 64), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
# data_root stays the stock one ('data/cityscapes/'), so `--cfg-options data_root=...` (the tools'
# rewrite of every dataloader) points these at the generated sets, as for any config.
demo_train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(pipeline=demo_train_pipeline))
demo_test_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(pipeline=demo_test_pipeline))
demo_max_iters = 150
# Validation is run by tools/demo.py on every evaluation set after training, not in the loop.
demo_train_cfg = dict(max_iters=demo_max_iters, val_interval=10**9)
demo_default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(by_epoch=False, interval=10**9, save_last=True, max_keep_ckpts=1),
    visualization=dict(draw=False))
# Same shape for every method: PolyLR to 0 at max_iters (`end` defaults to max_iters). eta_min=0
# keeps DAFT's predictor/backbone LR ratio to the end (DAFTHook checks it).
demo_param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, by_epoch=False)]
demo_env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
