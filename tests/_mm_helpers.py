"""Shared pieces of the OpenMMLab-layer tests: tiny generated datasets, the real DAFT configs with
their stock base swapped for the tiny one, and a probe hook that records the model at a chosen
point of the Runner's life. Not a test module (no ``test_`` prefix)."""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'
TINY = CONFIGS / '_tiny_'
_RUN_IDS = itertools.count()

#: stock base of each real config -> the tiny config that stands in for it in tests
SWAPS = {
    'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py':
        TINY / 'tiny_deeplabv3_cityscapes.py',
    'mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py':
        TINY / 'tiny_deeplabv3_voc.py',
    'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py': TINY / 'tiny_faster-rcnn_voc.py',
    'mmdet::pascal_voc/retinanet_r50_fpn_1x_voc0712.py': TINY / 'tiny_retinanet_voc.py',
    'mmdet::cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py': TINY / 'tiny_mask-rcnn_cityscapes.py',
    # no stock RetinaNet Cityscapes config: configs/detection/_base_/ holds the full-size one
    './_base_/retinanet_r50_fpn_1x_cityscapes.py': TINY / 'tiny_retinanet_cityscapes.py',
}


def shrink_config(config: Path, out_dir: Path) -> Path:
    """The real config ``config`` with its stock base replaced by the tiny stand-in: the DAFT
    lines under test are the shipped ones, byte for byte. Relative bases become absolute."""
    text = config.read_text()
    swapped = False
    for stock, tiny in SWAPS.items():
        if f"'{stock}'" in text:
            text = text.replace(f"'{stock}'", f"'{tiny}'")
            swapped = True
    for rel in ("'./_base_/", "'../_base_/"):
        text = text.replace(rel, "'" + str(config.parent) + '/' + rel[1:])
    # A sibling config as base (LP-FT stage 2 inherits the FT config): shrink it too.
    for sibling in config.parent.glob('*.py'):
        if f"'./{sibling.name}'" in text:
            text = text.replace(f"'./{sibling.name}'", f"'{shrink_config(sibling, out_dir)}'")
            swapped = True
    assert swapped, f'{config} has no stock base with a tiny stand-in'
    out = out_dir / f'tiny_{config.name}'
    out.write_text(text)
    return out


_PRETRAINED: Dict[str, str] = {}


def pretrained_backbone(cfg: Any) -> str:
    """A checkpoint of the config's backbone standing in for ImageNet weights (none can be
    downloaded here): its own init with every BN layer's statistics and affine parameters drawn
    at random (seeded), so that conversion has something to move. One file per backbone config
    and process, loaded through ``init_cfg`` as users load pretrained weights."""
    import json
    import tempfile

    from mmengine.registry import MODELS, DefaultScope

    from daft_mm.mm.plan import unwrap
    model_cfg = cfg.model.get('model', cfg.model) if cfg.model.get('type') in (
        'DAFTModel', 'daft_mm.DAFTModel') else cfg.model
    key = json.dumps(model_cfg.get('backbone'), sort_keys=True, default=str)
    if key not in _PRETRAINED:
        torch.manual_seed(0)
        built = dict(model_cfg)
        if 'pretrained' in built:  # mmseg: the stock ImageNet path is not loaded here
            built['pretrained'] = None
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
            backbone = unwrap(MODELS.build(built)).backbone
        with torch.no_grad():
            for module in backbone.modules():
                if isinstance(getattr(module, 'running_mean', None), torch.Tensor):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
        path = Path(tempfile.mkdtemp(prefix='daft_pretrained_')) / 'backbone.pth'
        torch.save({'state_dict': backbone.state_dict()}, path)
        _PRETRAINED[key] = str(path)
    return _PRETRAINED[key]


def pretrained_options(config: Path) -> List[str]:
    """``--cfg-options`` entries that load :func:`pretrained_backbone` into the config's backbone
    (``model.backbone`` reaches the wrapped model of a ``DAFTModel`` too)."""
    from mmengine.config import Config
    path = pretrained_backbone(Config.fromfile(str(config)))
    return ['model.backbone.init_cfg.type=Pretrained', f'model.backbone.init_cfg.checkpoint={path}']


def load_tiny(config: Path, work_dir: Path, data_root: str, pretrained: bool = True,
              **options: Any):
    """Config ready for a Runner: data under ``data_root``, work_dir, no validation during
    training (the tests evaluate with a separate test run), extra ``options`` merged.
    ``pretrained``: the backbone loads :func:`pretrained_backbone` through its ``init_cfg``, as
    a user's ImageNet backbone does (DAFT converts what was pretrained)."""
    from daft_mm.mm.cli import load_config
    opts = {'data_root': data_root, 'train_cfg.val_interval': 10**6,
            'default_hooks.logger.interval': 1}
    opts.update(options)
    cfg = load_config(str(config), opts, work_dir=str(work_dir))
    if pretrained:
        inner = cfg.model.model if cfg.model.get('type') in (
            'DAFTModel', 'daft_mm.DAFTModel') else cfg.model
        inner.backbone.init_cfg = dict(type='Pretrained', checkpoint=pretrained_backbone(cfg))
        inner.pop('pretrained', None)
    # Several Runners share one process: mmengine keys loggers and visualizers by name, and a
    # visualizer built under the stock name 'visualizer' would be handed to every later Runner
    # (writing into the first run's work dir).
    cfg.experiment_name = f'{Path(config).stem}_{os.getpid()}_{next(_RUN_IDS)}'
    if cfg.get('visualizer') is not None:
        cfg.visualizer['name'] = cfg.experiment_name
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.pop('visualization', None)
    return cfg


class ProbeHook(Hook):
    """Runs ``fn(model)`` on the unwrapped model in ``before_train`` and keeps the results."""

    def __init__(self, fn: Callable[[torch.nn.Module], Any]) -> None:
        self.fn = fn
        self.records: List[Any] = []

    def before_train(self, runner: Any) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.records.append(self.fn(model))


def state_copy(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cpu_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(REPO))
    return env
