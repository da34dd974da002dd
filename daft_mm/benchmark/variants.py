"""Every compared method's config, derived from one fine-tuning config.

A user has one config (their model, data, pipelines, schedule). FT is that config; LP freezes
its backbone; LP-FT's second stage is FT from the probe; DAFT and its ablations add what the DAFT
fragment (``configs/_base_/daft.py``) adds: the ``DAFTModel`` method, ``DAFTHook`` and the head
LR keys. Deriving them here, instead of asking for one config per method, is what lets
``tools/compare.py`` compare methods on any segmentation or detection config with the same code
path: the model is the segmentor or the detector, its ``backbone`` is what was pretrained, and
everything else (decode head; neck, RPN, RoI and dense heads) is new.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

from .methods import MethodSpec, Point

__all__ = ['segmentor_of', 'method_config']


def segmentor_of(cfg: Any) -> dict:
    """The model config (segmentor or detector), unwrapped from a ``DAFTModel`` if the config
    has one."""
    model = cfg.model
    inner = model.get('model') if model.get('type') == 'DAFTModel' else model
    return copy.deepcopy(inner.to_dict() if hasattr(inner, 'to_dict') else dict(inner))


def method_config(cfg: Any, spec: MethodSpec, point: Point, *, backbone: str,
                  backbone_prefix: str = 'backbone.', stage: Optional[str] = None) -> Any:
    """Make ``cfg`` (a loaded FT config, changed in place and returned) train ``spec`` at
    ``point``, starting from the pretrained ``backbone``. ``stage='lp'``: LP-FT's probe stage
    (the LP method); LP-FT's second stage is FT (the caller sets ``load_from``)."""
    inner = segmentor_of(cfg)
    # The backbone comes from the pretrained checkpoint, the way a user starts from ImageNet
    # weights; every head keeps its own fresh initialisation. `pretrained` would conflict.
    if 'pretrained' in inner:  # mmseg segmentors have the key, mmdet detectors do not
        inner['pretrained'] = None
    init = dict(type='Pretrained', checkpoint=backbone)
    if backbone_prefix:  # none: the checkpoint is the backbone's own state dict
        init['prefix'] = backbone_prefix
    inner.setdefault('backbone', {})['init_cfg'] = init
    recipe = 'lp' if stage == 'lp' else spec.recipe
    if recipe.startswith('daft'):
        _trainable_bn(inner['backbone'])
    wrapper = dict(type='DAFTModel', method=recipe, model=inner)
    if recipe == 'lp':
        wrapper['feature_extractor'] = ['backbone']
    cfg.model = wrapper
    cfg.optim_wrapper.optimizer.lr = point.lr
    if spec.head_lr_mult is not None and recipe != 'lp':  # the stock practice, as users write it
        paramwise = dict(cfg.optim_wrapper.get('paramwise_cfg') or {})
        paramwise['custom_keys'] = dict(paramwise.get('custom_keys') or {},
                                        head=dict(lr_mult=spec.head_lr_mult))
        cfg.optim_wrapper.paramwise_cfg = paramwise
    if spec.l2sp:
        if point.strength is None:
            raise ValueError(f'{spec.name} needs an L2-SP strength in its setting')
        paramwise = dict(cfg.optim_wrapper.get('paramwise_cfg') or {})
        paramwise['l2sp'] = dict(strength=point.strength, modules=['backbone'])
        cfg.optim_wrapper.paramwise_cfg = paramwise
        cfg.optim_wrapper.constructor = 'L2SPOptimWrapperConstructor'
    imports = list((cfg.get('custom_imports') or {}).get('imports', []))
    if 'daft_mm' not in imports:
        cfg.custom_imports = dict(imports=imports + ['daft_mm'], allow_failed_imports=False)
    # a DAFT config as the base: its DAFTHook is the DAFT methods' only
    hooks = [h for h in (cfg.get('custom_hooks') or [])
             if h.get('type') not in ('DAFTHook', 'daft_mm.DAFTHook')]
    if recipe.startswith('daft'):
        ratio = point.ratio if spec.has_ratio else None
        cfg.daft_head_lr_mult = ratio if ratio is not None else 1.0
        if point.scope is not None:
            cfg.daft_head_modules = point.scope
        # converted.pth is for users' runs; a ratio of 1 (conversion only) is FT's single LR
        hook = dict(type='DAFTHook', save_converted=False, check_lr=ratio is None or ratio > 1)
        if not spec.zero_init:
            hook['zero_init'] = False
        hooks.append(hook)
    cfg.custom_hooks = hooks
    return cfg


def _trainable_bn(backbone: dict) -> None:
    """Give the backbone what the detection DAFT fragment asks of one (its ``daft_backbone``: BN
    in train mode, trainable, no frozen stage, eps > 0; stock mmdet configs freeze BN, which
    DAFTHook refuses), changing only the settings that keep BN from training: the norm type and
    a nonzero eps stay the user's. The other rows keep the config's backbone: that is the FT users
    have."""
    from daft_mm.mm.zoo import daft_backbone
    wanted = daft_backbone('mmdet')
    if backbone.get('norm_eval'):
        backbone['norm_eval'] = wanted['norm_eval']
    if (backbone.get('frozen_stages') or -1) > 0:  # 0 (the stem alone) is allowed
        backbone['frozen_stages'] = wanted['frozen_stages']
    norm = backbone.get('norm_cfg')
    if isinstance(norm, dict):
        norm = dict(norm)
        if norm.get('requires_grad') is False:
            norm['requires_grad'] = wanted['norm_cfg']['requires_grad']
        if norm.get('eps') == 0:
            norm['eps'] = wanted['norm_cfg']['eps']
        backbone['norm_cfg'] = norm
