"""How far fine-tuning moved a backbone from its start: the offline analysis of
``tools/analyze_distortion.py`` as a function (the tool keeps argument parsing, plots and files).

For every fine-tuned checkpoint, against the pretrained backbone (and, for DAFT runs, against the
model right after BN conversion): feature similarity on a dataset split (cosine and L2 of pooled
backbone features, cosine per pixel) and the per-layer relative parameter change.
"""
from __future__ import annotations

import copy
import difflib
import math
import os.path as osp
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['PRETRAINED', 'CONVERTED', 'REFERENCE_DOC', 'backbone_state', 'load_backbone',
           'build_loader', 'analyze_distortion']

PRETRAINED = 'pretrained'
CONVERTED = 'converted'
REFERENCE_DOC = {
    PRETRAINED: 'the pretrained backbone (--pretrained)',
    CONVERTED: 'the model right after DAFT BN conversion (the start of a DAFT run)',
}


# ----------------------------------------------------------------------------- checkpoints
def backbone_state(path: str, backbone: nn.Module, what: str) -> Dict[str, torch.Tensor]:
    """The backbone part of a checkpoint, checked against the backbone the config builds.

    Accepts whole-model checkpoints (keys ``backbone.*``, an optional ``state_dict`` wrapper and
    ``module.`` prefix) and bare backbone checkpoints. Missing keys and shape mismatches are errors
    (they mean the checkpoint belongs to another architecture); extra keys of a bare backbone
    checkpoint (a classifier, say) are ignored.
    """
    from mmengine.runner import CheckpointLoader

    if not osp.isfile(path):
        raise FileNotFoundError(f'{what} checkpoint {path!r} does not exist')
    ckpt = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise ValueError(f'{what} checkpoint {path!r} holds no state dict of tensors')
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    if any(k.startswith('backbone.') for k in state):
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}

    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith('num_batches_tracked')]
    if missing:
        close = difflib.get_close_matches(missing[0], list(state), n=3)
        raise KeyError(
            f'{what} checkpoint {path!r} lacks {len(missing)} of the {len(expected)} backbone '
            f'entries the config builds (first: {missing[:4]})'
            + (f'; similar names in the checkpoint: {close}' if close else '')
            + '. Is it a checkpoint of this architecture (depth, stem type)? Use the config the '
            'checkpoint was trained with, or fix the key names.')
    wrong = [f'{k}: config {tuple(v.shape)} vs checkpoint {tuple(state[k].shape)}'
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise ValueError(f'{what} checkpoint {path!r} does not match the backbone the config '
                         f'builds ({len(wrong)} shape mismatches, first: {wrong[:3]}). Use the '
                         'config the checkpoint was trained with.')
    return {k: state[k] for k in expected if k in state}


def load_backbone(template: nn.Module, path: str, what: str, device: str) -> nn.Module:
    backbone = copy.deepcopy(template)
    backbone.load_state_dict(backbone_state(path, template, what), strict=False)
    backbone.to(device)
    backbone.requires_grad_(False)
    backbone.eval()  # mmseg's ResNet.train() returns None: no chaining
    return backbone


# ------------------------------------------------------------------------------------- data
def build_loader(cfg: Any, split: str, num_workers: int, shuffle: Optional[bool] = None,
                 seed: Optional[int] = None):
    from mmengine.runner import Runner

    key = f'{split}_dataloader'
    if not cfg.get(key):
        raise KeyError(f'the config has no {key}; pick another --split')
    loader_cfg = copy.deepcopy(cfg[key])
    loader_cfg['num_workers'] = num_workers
    if num_workers == 0:
        loader_cfg['persistent_workers'] = False
    if shuffle is not None and isinstance(loader_cfg.get('sampler'), Mapping):
        loader_cfg['sampler'] = dict(loader_cfg['sampler'], shuffle=shuffle)
    return Runner.build_dataloader(loader_cfg, seed=seed)


# ------------------------------------------------------------------------------- analysis
def analyze_distortion(cfg: Any, pretrained: str, finetuned: Sequence[Tuple[str, str]], *,
                       reference_converted: Sequence[Tuple[str, str]] = (),
                       convert: Sequence[str] = (), split: str = 'val',
                       max_images: Optional[int] = None, levels: Optional[Sequence[int]] = None,
                       device: str = 'cpu', num_workers: int = 0, seed: Optional[int] = 0,
                       convert_split: str = 'train', convert_batches: Optional[int] = None,
                       convert_var_mode: str = 'batch') -> Dict[str, Any]:
    """Compare each ``(name, checkpoint)`` of ``finetuned`` with the ``pretrained`` backbone of
    the config ``cfg`` (an mmengine Config) and, for the names in ``reference_converted``
    (``(name, converted.pth)``) or ``convert`` (converted here with ``convert_bn`` on
    ``convert_split``), with the converted model. Returns a JSON-safe dict of every number, each
    labelled with its reference."""
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import ProgressBar

    from daft_mm.core import make_plan, prepare, relative_change

    from .hooks.distortion_hook import backbone_inputs, compare_backbones
    from .preparation import count_batches, one_pass_loader

    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model = MODELS.build(cfg.model)  # no init_weights: weights come from the checkpoints
    model.to(device)
    model.eval()
    if not isinstance(getattr(model, 'backbone', None), nn.Module):
        raise ValueError(f'{type(model).__name__} has no .backbone to analyse')
    template = model.backbone

    backbones: Dict[str, nn.Module] = OrderedDict()
    ref_ckpt: Dict[str, str] = {}
    backbones[PRETRAINED] = load_backbone(template, pretrained, 'pretrained', device)
    for name, path in finetuned:
        backbones[name] = load_backbone(template, path, f'run {name!r}', device)
    for name, path in reference_converted:
        backbones[f'{CONVERTED}:{name}'] = load_backbone(template, path,
                                                         f'converted reference of {name!r}',
                                                         device)
        ref_ckpt[name] = path
    conversion_reports = {}
    if convert:
        converted = copy.deepcopy(backbones[PRETRAINED])
        # DAFTHook's statistics loader: one finite pass (the training split's InfiniteSampler
        # never ends), at most --convert-batches, with its progress bar.
        loader = one_pass_loader(build_loader(cfg, convert_split, num_workers),
                                 seed=seed)
        total = count_batches(loader, convert_batches)
        print(f'converting BN of the pretrained backbone on the {convert_split} split: '
              f'{total} batches', flush=True)
        bar = ProgressBar(total)
        # the whole backbone is the pretrained part: every BN layer of it is converted
        plan = make_plan(converted, pretrained=[''], predictors=(), zero_init=False)
        report = prepare(converted, loader, plan, max_batches=total, var_mode=convert_var_mode,
                         forward=lambda m, batch: m(backbone_inputs(model, batch, True)),
                         progress=lambda _: bar.update()).report
        bar.file.write('\n')
        print(report.summary(max_rows=5))
        desc = (f'pretrained converted here with convert_bn on the {convert_split} split '
                f'({report.num_batches} batches, {convert_var_mode} variance)')
        for name in convert:
            backbones[f'{CONVERTED}:{name}'] = converted
            ref_ckpt[name] = desc
        conversion_reports = {'description': desc, 'report': report.to_dict()}

    # Which reference each run is compared against.
    comparisons: Dict[str, List[Tuple[str, str]]] = {}  # run -> [(ref kind, backbone key)]
    for name, _ in finetuned:
        comparisons[name] = [(PRETRAINED, PRETRAINED)]
        if name in ref_ckpt:
            comparisons[name].append((CONVERTED, f'{CONVERTED}:{name}'))
    pairs = sorted({(key, run) for run, refs in comparisons.items() for _, key in refs})

    loader = build_loader(cfg, split, num_workers, shuffle=False)
    stats, num_images = compare_backbones(model, backbones, pairs, loader,
                                          max_images=max_images, levels=levels)
    levels = sorted(next(iter(stats.values())))

    states = {key: {k: v.detach().cpu() for k, v in b.state_dict().items()}
              for key, b in backbones.items()}
    result: Dict[str, Any] = {
        'config': cfg.filename, 'split': split, 'num_images': num_images,
        'feature_levels': levels,
        'reference_kinds': {kind: REFERENCE_DOC[kind] for kind in
                            ([PRETRAINED] + ([CONVERTED] if ref_ckpt else []))},
        'notes': {
            'cosine': 'cosine of globally average-pooled backbone features, per image',
            'l2': 'Euclidean distance of the pooled features, per image',
            'pixel_cosine': 'channel cosine per spatial position; mean is pixel-weighted',
            'relative': '||theta - theta_ref|| / ||theta_ref|| per tensor; null where the '
                        'reference tensor is zero and it moved (see abs_change, zero_reference)',
            'means': 'unweighted means over layers, null rows skipped',
        },
        'runs': {},
    }
    if conversion_reports:
        result['conversion'] = conversion_reports
    for run, path in finetuned:
        entry: Dict[str, Any] = {'checkpoint': path, 'comparisons': {}}
        for kind, key in comparisons[run]:
            change = relative_change(states[key], states[run])
            entry['comparisons'][kind] = {
                'reference_checkpoint': pretrained if kind == PRETRAINED else ref_ckpt[run],
                'features': {str(level): stats[(key, run)][level].to_dict() for level in levels},
                'parameters': change.to_dict(),
            }
        result['runs'][run] = entry
    result = _clean(result)

    return result


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON has no NaN), tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
