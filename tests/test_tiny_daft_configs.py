"""The tiny DAFT twins and the data generator (issue 22 items 10, 11, 13): each twin trains through
the real Runner on the generator's output with the stock LR schedule it inherits, and the generator
writes what every shipped config reads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmengine.registry import DATASETS, init_default_scope
from mmengine.runner import Runner

from _mm_helpers import CONFIGS, TINY, load_tiny
from daft_mm.mm.cli import load_config

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')

TWINS = sorted(p.name for p in TINY.glob('tiny_daft_*.py'))


@pytest.fixture(scope='module')
def generated(tmp_path_factory) -> Path:
    """``python -m daft_mm.mm.datasets ROOT`` as the README's quick start runs it."""
    from daft_mm.mm.datasets.synthetic import main
    root = tmp_path_factory.mktemp('synthetic')
    main([str(root), '--num-train', '4', '--num-val', '2'])
    return root


def _root_for(cfg_root: str, generated: Path) -> str:
    if 'VOC2012' in cfg_root:
        return str(generated / 'VOCdevkit' / 'VOC2012')
    if 'VOCdevkit' in cfg_root:
        return str(generated / 'VOCdevkit') + '/'
    assert 'cityscapes' in cfg_root, cfg_root
    return str(generated / 'cityscapes') + '/'


def test_every_fp_config_has_a_daft_twin():
    plain = sorted(p.name for p in TINY.glob('tiny_*.py') if not p.name.startswith('tiny_daft_'))
    assert [f'tiny_daft_{n[len("tiny_"):]}' for n in plain] == TWINS


SHIPPED = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob('*.py')
                 if '_base_' not in p.parts and p.parts[-2] not in ('demo', 'ood', 'camvid'))


@pytest.mark.parametrize('config', SHIPPED)
def test_generator_writes_what_every_shipped_config_reads(config, generated):
    from mmengine.config import Config
    declared = Config.fromfile(str(CONFIGS / config)).get('data_root')
    cfg = load_config(str(CONFIGS / config), {'data_root': _root_for(declared, generated)})
    init_default_scope(cfg.default_scope)
    for key in ('train_dataloader', 'val_dataloader'):
        dataset = DATASETS.build(cfg[key].dataset)
        assert len(dataset) > 0, f'{config}: {key} is empty'


@pytest.mark.parametrize('twin', TWINS)
def test_tiny_daft_twin_trains_with_its_stock_schedule(twin, generated, tmp_path):
    from mmengine.config import Config
    declared = Config.fromfile(str(TINY / twin)).data_root
    cfg = load_tiny(TINY / twin, tmp_path / 'work', _root_for(declared, generated),
                    **{'train_cfg.max_iters': 2, 'train_dataloader.batch_size': 2})
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if type(h).__name__ == 'DAFTHook')
    assert hook.plan.conversion.converted, 'the pretrained backbone was converted'
    net = runner.model
    lr_of = {id(p): g['lr'] for g in runner.optim_wrapper.param_groups for p in g['params']}
    backbone = lr_of[id(next(net.backbone.parameters()))]
    predictor = next(iter(hook.plan.predictors))
    head = lr_of[id(dict(net.named_parameters())[f'{predictor}.weight'])]
    # the head/backbone ratio holds after the schedule stepped (PolyLR eta_min=1e-4 for seg)
    assert head / backbone == pytest.approx(hook.plan.head_lr_mult, rel=1e-9)
