"""BN conversion decides from what a backbone's ``Pretrained`` init_cfg actually fills (keys after
its prefix, with their shapes), not from the ``type='Pretrained'`` a config declares (issue 32,
item 1): mmengine loads non-strictly and only logs the keys it missed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip('mmseg')

import daft_mm  # noqa: E402,F401  (registers DAFTHook / DAFTModel)
from mmengine.registry import MODELS, DefaultScope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from _mm_helpers import TINY, load_tiny, pretrained_backbone  # noqa: E402

CONFIG = TINY / 'tiny_daft_deeplabv3_cityscapes.py'
torch.set_num_threads(1)


def _plan(cfg, checkpoint: str, prefix: str = ''):
    """The DAFT plan of the tiny config whose backbone's init_cfg loads ``checkpoint``."""
    from daft_mm.mm.plan import decide_plan
    _inner(cfg).backbone.init_cfg = dict(type='Pretrained', checkpoint=checkpoint,
                                         **({'prefix': prefix} if prefix else {}))
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    net = getattr(model, 'model', model)
    return decide_plan(cfg, model).conversion, net


def _inner(cfg):
    return cfg.model.model if cfg.model.get('type') in ('DAFTModel', 'daft_mm.DAFTModel') \
        else cfg.model


def _save(tmp_path: Path, name: str, state: dict) -> str:
    path = tmp_path / name
    torch.save({'state_dict': state}, path)
    return str(path)


@pytest.fixture
def tiny(tmp_path, cityscapes_root):
    cfg = load_tiny(CONFIG, tmp_path / 'work', cityscapes_root)
    return cfg, torch.load(pretrained_backbone(cfg), weights_only=True)['state_dict']


def test_a_checkpoint_under_another_prefix_loads_nothing_and_converts_nothing(tiny, tmp_path):
    cfg, backbone = tiny
    # what `tools/convert_checkpoint.py --prefix backbone.` writes (for load_from), given to
    # the backbone's init_cfg without a prefix: mmengine loads none of it
    wrong = _save(tmp_path, 'model.pth', {f'backbone.{k}': v for k, v in backbone.items()})
    plan, _ = _plan(cfg, wrong)
    assert plan.converted == () and plan.pretrained == ()
    (note, ) = plan.notes
    assert note.startswith(f'backbone: its init_cfg Pretrained {wrong} fills none of its')
    assert "under the prefix 'backbone.'" in note and "prefix='backbone.'" in note
    # the prefix it names makes it whole again
    plan, net = _plan(cfg, wrong, prefix='backbone.')
    assert [p for p, _ in plan.pretrained] == ['backbone'] and not plan.notes
    assert plan.converted and all(n.startswith('backbone.') for n in plan.converted)


def test_a_partly_filled_backbone_converts_only_what_loaded(tiny, tmp_path):
    cfg, backbone = tiny
    part = {k: v for k, v in backbone.items() if k.startswith(('stem.', 'layer1.'))}
    plan, net = _plan(cfg, _save(tmp_path, 'part.pth', part))
    bns = [n for n, m in net.named_modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    expected = [n for n in bns if n.startswith(('backbone.stem.', 'backbone.layer1.'))]
    assert expected and list(plan.converted) == expected
    assert 'backbone.layer2.0.bn1' in plan.left_new
    assert {p for p, _ in plan.pretrained} == {'backbone.stem', 'backbone.layer1'}
    (note, ) = plan.notes
    total = sum(1 for k in backbone if not k.endswith('num_batches_tracked'))
    filled = sum(1 for k in part if not k.endswith('num_batches_tracked'))
    assert f'fills {filled} of its {total} tensors' in note
    # a BN layer counts only if its own weights and statistics loaded
    no_stats = {k: v for k, v in part.items() if k != 'layer1.0.bn1.running_var'}
    plan, _ = _plan(cfg, _save(tmp_path, 'no_stats.pth', no_stats))
    assert 'backbone.layer1.0.bn1' in plan.left_new
    assert 'backbone.layer1.0.bn2' in plan.converted


def test_the_run_says_what_loaded_and_leaves_an_unfilled_backbone_as_initialised(
        tiny, tmp_path):
    """End to end with the Runner: nothing loaded -> nothing converted, the no-pretrained-weights
    warning names the init_cfg and the prefix, the start-up block carries the note."""
    from daft_mm.mm.hooks import DAFTHook
    cfg, backbone = tiny
    wrong = _save(tmp_path, 'model.pth', {f'backbone.{k}': v for k, v in backbone.items()})
    _inner(cfg).backbone.init_cfg = dict(type='Pretrained', checkpoint=wrong)
    cfg.train_cfg.max_iters = 1
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, DAFTHook))
    assert hook.plan.conversion.converted == ()
    log = Path(runner.log_dir, f'{runner.timestamp}.log').read_text()
    assert 'no BatchNorm layer is converted' in log
    assert "fills none of its" in log and "prefix='backbone.'" in log
    assert 'NOTE backbone: its init_cfg Pretrained' in log.split('DAFT start-up')[-1]


# ------------------------------------------------- issue 32 item 3: a repeated training set
def test_the_statistics_pass_reads_a_repeated_training_set_once(tmp_path, cityscapes_root):
    """RepeatDataset (times=8, as in the stock Cityscapes detection configs) inside a
    ConcatDataset: the pass reads each underlying image once, and the start-up block says how
    many images it read."""
    from conftest import NUM_TRAIN
    cfg = load_tiny(CONFIG, tmp_path / 'work', cityscapes_root)
    dataset = cfg.train_dataloader.dataset
    cfg.train_dataloader.dataset = dict(type='ConcatDataset', datasets=[
        dict(type='RepeatDataset', times=8, dataset=dataset), dataset])
    cfg.train_cfg.max_iters = 1
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert len(runner.train_dataloader.dataset) == 9 * NUM_TRAIN  # what training iterates
    log = Path(runner.log_dir, f'{runner.timestamp}.log').read_text()
    block = log.split('DAFT start-up')[-1]
    assert f', {2 * NUM_TRAIN} image(s) in all' in block  # each part's images once, not 9x
