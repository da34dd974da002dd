"""Clear messages where odd data or an odd model used to give a raw error (or a wrong one): a model
on the meta device, zero-size batches, an empty training set, a label id out of range, and a
dataset smaller than the number of ranks (real gloo processes)."""
from __future__ import annotations

import copy
import datetime
import os
import shutil
from pathlib import Path

import cv2
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from daft_mm.core import ConversionError, convert_bn


def test_model_on_the_meta_device_is_named():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to('meta')
    with pytest.raises(ConversionError, match='meta device.*to_empty'):
        convert_bn(net, [torch.randn(2, 3, 8, 8)])


def test_zero_size_batches_are_named():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConversionError, match='every batch reaching the BN layers was empty'):
        convert_bn(net, [torch.empty(0, 3, 8, 8), torch.empty(0, 3, 8, 8)])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# --------------------------------------------------------------------------- OpenMMLab layer
pytest.importorskip('mmseg')

import daft_mm  # noqa: E402,F401
from _mm_helpers import CONFIGS, ProbeHook, load_tiny, shrink_config, state_copy  # noqa: E402
from _tools import load_tool  # noqa: E402

TINY_SEG = str(Path(__file__).resolve().parents[1] / 'configs' / '_tiny_' /
               'tiny_deeplabv3_cityscapes.py')


def test_empty_training_set_names_the_dataset(tmp_path):
    for split in ('train', 'val'):
        (tmp_path / 'data' / 'leftImg8bit' / split).mkdir(parents=True)
        (tmp_path / 'data' / 'gtFine' / split).mkdir(parents=True)
    with pytest.raises(ValueError, match=r'CityscapesDataset found no samples.*leftImg8bit/train'
                                         r'.*data_root'):
        load_tool('train').main([TINY_SEG, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                                 f'data_root={tmp_path / "data"}', 'train_cfg.max_iters=1'])


def test_label_out_of_range_names_the_file(cityscapes_root, tmp_path):
    from mmengine.runner import Runner
    root = tmp_path / 'cs'
    shutil.copytree(cityscapes_root, root)
    bad = sorted(root.glob('gtFine/train/*/*_labelTrainIds.png'))[0]
    label = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    label[:8, :8] = 40  # 19 classes, ignore_index 255
    cv2.imwrite(str(bad), label)
    cfg = load_tiny(shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', tmp_path),
                    tmp_path / 'work', str(root), **{'train_cfg.max_iters': 1})
    with pytest.raises(ConversionError, match=rf'{bad.name}.*label id is outside'):
        Runner.from_cfg(cfg).train()


# ---------------------------------------------------- a dataset smaller than the number of ranks
WORLD = 2


def _small_dataset_worker(rank: int, init_file: str, cfg_path: str, work_dir: str,
                          data_root: str, out_dir: str) -> None:
    from mmengine.runner import Runner
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        cfg = load_tiny(Path(cfg_path), Path(work_dir), data_root, **{
            'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2})
        cfg.launcher = 'pytorch'
        dataset = copy.deepcopy(cfg.train_dataloader.dataset)
        dataset.indices = 1  # one sample for two ranks: rank 1 has no batch
        loader = dict(batch_size=1, num_workers=0,
                      sampler=dict(type='DefaultSampler', shuffle=False, round_up=False),
                      dataset=dataset)
        # the backbone only: one image gives its BN layers many values per channel (the ASPP
        # image-pool BN would see a single one, which has no variance)
        cfg.custom_hooks = [dict(type='DAFTHook', dataloader=loader, modules=['backbone'])]
        runner = Runner.from_cfg(cfg)
        probe = ProbeHook(lambda model: state_copy(model.model))
        runner.register_hook(probe, priority='VERY_LOW')
        runner.train()
        torch.save(probe.records[0], os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_dataset_smaller_than_the_ranks_converts_on_every_rank(cityscapes_root, tmp_path):
    """Before: rank 1 failed with "dataset of 1 samples ... give a non-empty dataset". Now the
    rank without a batch still takes part in pooling, and both ranks end identical."""
    cfg_path = str(shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', tmp_path))
    mp.spawn(_small_dataset_worker, nprocs=WORLD, join=True,
             args=(str(tmp_path / 'pg'), cfg_path, str(tmp_path / 'work'), cityscapes_root,
                   str(tmp_path)))
    first, second = (torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD))
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert first['backbone.layer1.0.bn1.running_mean'].abs().sum() > 0
