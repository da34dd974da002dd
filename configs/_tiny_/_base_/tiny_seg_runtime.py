# Runtime + schedule of the tiny segmentation configs: the stock mmseg runtime and 20k schedule
# (SGD, PolyLR, IterBasedTrainLoop) cut to 200 iterations. Tests shorten it further with
# --cfg-options train_cfg.max_iters=... .
_base_ = ['mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_20k.py']

max_iters = 200
# From scratch on a few tiny images a higher LR than the stock 0.01 learns much faster
# (synthetic Cityscapes, 16 images, 200 iterations: mIoU 51 at 0.05 vs 26 at 0.01 after 120).
optim_wrapper = dict(optimizer=dict(lr=0.05))
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=100)
# visualization.interval=1: with a handful of test images, `tools/test.py --show-dir` should
# paint each of them (the stock 50 would paint one at most). Drawing stays off unless asked.
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=100),
    visualization=dict(interval=1))
# CPU friendly: no cudnn autotuning; gloo also serves CPU-only multi-process runs (dist_train.sh).
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
# DDP with device_ids=None: mmengine's default is device_ids=[LOCAL_RANK], which DDP rejects
# for a CPU model; without them DDP uses the model's own device (CPU here, the GPU on a GPU box).
model_wrapper_cfg = dict(
    type='MMDistributedDataParallel',
    device_ids=None,
    broadcast_buffers=False,
    find_unused_parameters=False)
randomness = dict(seed=0)
