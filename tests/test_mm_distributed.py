"""DAFTHook under real torch.distributed: two processes (gloo, CPU), the Runner with
``launcher='pytorch'`` and MMDistributedDataParallel. After the hook, both ranks hold identical
weights, equal to one process converting over the same data."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip('mmseg')

from _mm_helpers import CONFIGS, ProbeHook, load_tiny, shrink_config, state_copy  # noqa: E402

WORLD = 2


def _config(cfg_path: str, work_dir: str, data_root: str, launcher: str):
    cfg = load_tiny(Path(cfg_path), Path(work_dir), data_root, **{
        'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2,
        'default_hooks.checkpoint.interval': 10**6})
    cfg.launcher = launcher
    # The statistics pass over a deterministic loader (no random crops/flips) and pooled
    # (population) variance: the result depends on the set of images only, not on how ranks and
    # batches split it (rank 0 sees images 0 and 2, rank 1 images 1 and 3, one process all four).
    dataset = copy.deepcopy(cfg.train_dataloader.dataset)
    dataset.pipeline = cfg.test_pipeline
    loader = dict(batch_size=2, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=False, round_up=False),
                  dataset=dataset)
    cfg.custom_hooks = [dict(type='DAFTHook', dataloader=loader, var_mode='population')]
    return cfg


def _run(cfg, out_file: str) -> None:
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    probe = ProbeHook(lambda model: state_copy(model.model))
    runner.register_hook(probe, priority='VERY_LOW')  # right after DAFTHook.before_train
    runner.train()
    torch.save({'state': probe.records[0], 'world': dist.get_world_size()
                if dist.is_initialized() else 1}, out_file)


def _worker(rank: int, init_file: str, cfg_path: str, work_dir: str, data_root: str,
            out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    # mmengine's init_dist('pytorch') calls torch.cuda.set_device, which a CPU-only torch cannot:
    # the process group is set up here, and the Runner (launcher='pytorch') adopts it.
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=WORLD)
    try:
        cfg = _config(cfg_path, work_dir, data_root, 'pytorch')
        # DDP over a CPU module takes no device_ids (mmengine's default passes LOCAL_RANK).
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                                     broadcast_buffers=False)
        _run(cfg, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_daft_hook_two_ranks_equal_one_process(cityscapes_root, tmp_path):
    cfg_path = str(shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', tmp_path))
    mp.spawn(_worker, nprocs=WORLD, join=True,
             args=(str(tmp_path / 'pg'), cfg_path, str(tmp_path / 'dist'), cityscapes_root,
                   str(tmp_path)))
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]
    assert [r['world'] for r in ranks] == [WORLD, WORLD]

    _run(_config(cfg_path, str(tmp_path / 'single'), cityscapes_root, 'none'),
         str(tmp_path / 'single.pt'))
    single = torch.load(tmp_path / 'single.pt', weights_only=False)['state']

    first, second = ranks[0]['state'], ranks[1]['state']
    assert set(first) == set(second) == set(single)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    for key in first:
        if key.endswith('num_batches_tracked'):
            continue
        torch.testing.assert_close(first[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    # The conversion happened (fresh BN stats are 0 / 1) and the predictors are zero.
    assert first['backbone.layer1.0.bn1.running_mean'].abs().sum() > 0
    assert first['decode_head.conv_seg.weight'].abs().sum() == 0
