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
from daft_mm.mm.optim import complete_daft_config  # noqa: E402
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
    with pytest.raises(ConversionError, match=rf'{bad.name}: label ids \[40\] are outside') as err:
        Runner.from_cfg(cfg).train()
    # the file, not the whole batch (issue 22 item 9)
    others = [p.name for p in root.glob('gtFine/train/*/*_labelTrainIds.png') if p != bad]
    assert others and not any(name in str(err.value) for name in others)


def test_label_of_another_size_than_its_image_names_the_file(cityscapes_root, tmp_path):
    """mmseg fails on it with "stack expects each tensor to be equal size" in some training
    step, naming no file (here every step: the label is narrower than any crop)."""
    from mmengine.runner import Runner
    root = tmp_path / 'cs'
    shutil.copytree(cityscapes_root, root)
    bad = sorted(root.glob('gtFine/train/*/*_labelTrainIds.png'))[1]
    label = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(bad), cv2.resize(label, (40, 60), interpolation=cv2.INTER_NEAREST))
    cfg = load_tiny(shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', tmp_path),
                    tmp_path / 'work', str(root), **{'train_cfg.max_iters': 4,
                                                     'train_dataloader.batch_size': 2})
    with pytest.raises((ConversionError, ValueError),
                       match=rf'{bad.name}: the label map does not match its image'):
        Runner.from_cfg(cfg).train()


def test_truncated_and_unsafe_checkpoints_are_named(tmp_path):
    import argparse
    import pickle

    from daft_mm.mm.safe_load import load_checkpoint_file
    whole = tmp_path / 'whole.pth'
    torch.save({'state_dict': {'w': torch.ones(3)}}, whole)
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(whole.read_bytes()[:150])
    with pytest.raises(RuntimeError, match=rf'{cut}.*not a complete checkpoint'):
        load_checkpoint_file(str(cut))
    unsafe = tmp_path / 'unsafe.pth'
    torch.save({'meta': argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(pickle.UnpicklingError,
                       match=r'add_safe_globals\(\[argparse\.Namespace\]\)'):
        load_checkpoint_file(str(unsafe))


def test_resume_falls_back_to_the_newest_whole_checkpoint(tmp_path):
    from mmengine.config import Config

    from daft_mm.mm import resume as train
    for it in (2, 4):
        torch.save({'state_dict': {}, 'meta': {'iter': it}}, tmp_path / f'iter_{it}.pth')
    (tmp_path / 'iter_6.pth').write_bytes((tmp_path / 'iter_4.pth').read_bytes()[:100])
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_6.pth'))
    cfg = Config(dict(work_dir=str(tmp_path), load_from=None))
    note = train.resolve_resume(cfg, 'auto')
    assert cfg.resume and cfg.load_from == str(tmp_path / 'iter_4.pth')
    assert 'iter_6.pth is truncated or corrupt' in note and 'skipped iter_6.pth' in note


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
        complete_daft_config(cfg)  # the plan's arguments changed after loading
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


# ------------------------------------------------------------ issue 32 item 5: name the problem
def test_an_empty_image_in_the_statistics_pass_is_named(tmp_path):
    """OpenCV's error for an empty file (`!buf.empty()`) names no file; the pass names it."""
    from mmengine.runner import Runner

    from daft_mm.mm.datasets import make_cityscapes
    root = tmp_path / 'cityscapes'
    make_cityscapes(root, num_train=4, num_val=2, seed=0)
    broken = sorted((root / 'leftImg8bit' / 'train').rglob('*.png'))[1]
    broken.write_bytes(b'')
    cfg = load_tiny(CONFIGS / '_tiny_' / 'tiny_daft_deeplabv3_cityscapes.py', tmp_path / 'w',
                    str(root), **{'train_cfg.max_iters': 1})
    with pytest.raises(ConversionError, match=rf'could not load {broken}'):
        Runner.from_cfg(cfg).train()


def test_nan_weights_are_named_as_the_checkpoints_not_the_datas():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float('nan')
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConversionError, match=r"weights hold NaN or Inf before any data was "
                       r"seen, in 1 tensor\(s\): 0\.weight\. .*checkpoint"):
        convert_bn(net, [torch.randn(4, 3, 8, 8)])
    assert all(torch.equal(v, before[k]) or torch.isnan(v).any()
               for k, v in net.state_dict().items())


def test_a_blocked_global_in_a_checkpoint_is_named(tmp_path):
    import pickle

    from daft_mm.mm.safe_load import load_checkpoint_file

    class RunsCommand:
        def __reduce__(self):
            return os.system, ('true', )
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': RunsCommand()}, path)
    with pytest.raises(pickle.UnpicklingError) as err:
        load_checkpoint_file(str(path))
    text = str(err.value)
    assert f'`{os.system.__module__}.system`' in text  # posix.system on Linux
    assert 'an object the weights_only unpickler refused' not in text


def test_a_daft_key_in_another_case_is_refused():
    from mmengine.config import Config

    from daft_mm.mm.settings import check_daft_keys
    with pytest.raises(ValueError, match=r'Daft_head_lr_mult \(did you mean daft_head_lr_mult'):
        check_daft_keys(Config(dict(Daft_head_lr_mult=20.0)))


def test_test_py_on_an_empty_dataset_names_it_and_its_folder(tmp_path):
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope

    from _tools import load_tool
    config = CONFIGS / '_tiny_' / 'tiny_deeplabv3_cityscapes.py'
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(Config.fromfile(str(config)).model)
    checkpoint = tmp_path / 'model.pth'
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    empty = tmp_path / 'empty'
    for sub in ('leftImg8bit/val', 'gtFine/val'):
        (empty / sub).mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"test_dataloader.dataset: CityscapesDataset found no "
                       rf"samples \(data_root='{empty}'"):
        load_tool('test').main([str(config), str(checkpoint), '--work-dir', str(tmp_path / 'w'),
                                '--cfg-options', f'data_root={empty}'])


def test_validation_on_an_empty_set_is_its_own_error(tmp_path, cityscapes_root, capsys):
    from _tools import load_tool
    config = CONFIGS / '_tiny_' / 'tiny_deeplabv3_cityscapes.py'
    common = [str(config), '--cfg-options', f'data_root={cityscapes_root}',
              'train_cfg.max_iters=1', 'train_dataloader.batch_size=2']
    with pytest.raises(ValueError, match=r'val_dataloader.dataset: CityscapesDataset holds no '
                       r'samples .*validation would score nothing'):
        load_tool('train').main(common + ['train_cfg.val_interval=1',
                                          'val_dataloader.dataset.indices=0',
                                          'val_dataloader.dataset.serialize_data=False',
                                          '--work-dir', str(tmp_path / 'a')])
    assert 'finished without a validation run' not in capsys.readouterr().out
    load_tool('train').main(common + ['val_cfg=None', 'val_dataloader=None',
                                      'val_evaluator=None', '--work-dir', str(tmp_path / 'b')])
    assert 'training finished without a validation run' in capsys.readouterr().out
