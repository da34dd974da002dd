"""L2-SP (Li, Grandvalet & Davoine, ICML 2018): fine-tuning with an L2 pull toward the starting
(pretrained) weights instead of weight decay toward zero, a robust fine-tuning baseline the
comparison runs next to DAFT.

As mmengine pieces, so a config says it and the optimizer is built once:

    optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, ...),
                         constructor='L2SPOptimWrapperConstructor',
                         paramwise_cfg=dict(l2sp=dict(strength=0.01, modules=['backbone'])))

The constructor turns weight decay off on ``modules`` (``decay_mult=0``; the rest keeps it) and
builds an :class:`L2SPOptimWrapper`, which adds ``strength * (w - w0)`` to the gradient of every
parameter of those modules before each step: the gradient of ``strength / 2 * ||w - w0||^2``.
``w0`` is taken at the first step, i.e. after the Runner loaded the pretrained weights (they load
after the optimizer is built), and travels in the checkpoint, so a resumed run keeps its anchor.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS
from torch import nn

from daft_mm.core import resolve_modules

from .plan import split_model

__all__ = ['L2SPOptimWrapper', 'L2SPOptimWrapperConstructor']

_ANCHORS = 'l2sp_anchors'


@OPTIM_WRAPPERS.register_module()
class L2SPOptimWrapper(OptimWrapper):
    """An ``OptimWrapper`` whose step pulls ``anchored`` parameters toward their values at the
    first step with ``strength``."""

    def __init__(self, optimizer: Any, strength: float = 0.01, **kwargs: Any) -> None:
        if not strength >= 0:
            raise ValueError(f'L2-SP strength must be >= 0, got {strength!r}')
        super().__init__(optimizer, **kwargs)
        self.strength = float(strength)
        self.anchored: List[nn.Parameter] = []  # set by L2SPOptimWrapperConstructor
        self.anchors: Optional[List[torch.Tensor]] = None  # w0, taken at the first step

    def penalty(self) -> torch.Tensor:
        """``strength / 2 * ||w - w0||^2`` over the anchored parameters (0 before the first
        step: the weights are their own anchor)."""
        if self.anchors is None or not self.anchored:
            return torch.zeros(())
        return 0.5 * self.strength * sum(((p - a) ** 2).sum()
                                          for p, a in zip(self.anchored, self.anchors))

    def step(self, **kwargs: Any) -> None:
        if self.anchors is None:
            self.anchors = [p.detach().clone() for p in self.anchored]
        if self.strength:
            with torch.no_grad():
                for p, anchor in zip(self.anchored, self.anchors):
                    if p.grad is not None:
                        p.grad.add_(p.detach() - anchor, alpha=self.strength)
        super().step(**kwargs)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.anchors is not None:
            state[_ANCHORS] = [a.detach().cpu() for a in self.anchors]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        anchors = state_dict.pop(_ANCHORS, None)
        super().load_state_dict(state_dict)
        if anchors is not None:
            if len(anchors) != len(self.anchored):
                raise ValueError(f'the checkpoint holds {len(anchors)} L2-SP anchors for '
                                 f'{len(self.anchored)} anchored parameters: another model')
            self.anchors = [a.to(p.device, p.dtype) for a, p in zip(anchors, self.anchored)]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class L2SPOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor, with ``paramwise_cfg.l2sp = dict(strength, modules)``:
    no weight decay on ``modules`` (default ``['backbone']``), an :class:`L2SPOptimWrapper`
    pulling them toward their starting weights instead."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        paramwise = dict(paramwise_cfg or {})
        settings = dict(paramwise.pop('l2sp', None) or {})
        self.strength = float(settings.get('strength', 0.01))
        self.modules: Sequence[str] = list(settings.get('modules', ['backbone']))
        custom = dict(paramwise.get('custom_keys') or {})
        for name in self.modules:
            custom[name] = dict(custom.get(name) or {}, decay_mult=0.0)
        paramwise['custom_keys'] = custom
        kind = optim_wrapper_cfg.get('type', 'OptimWrapper')
        if kind not in ('OptimWrapper', 'L2SPOptimWrapper'):
            raise ValueError(f'L2-SP needs optim_wrapper.type OptimWrapper, got {kind!r} (AMP '
                             'is not supported with L2-SP here)')
        super().__init__(dict(optim_wrapper_cfg, type='L2SPOptimWrapper',
                              strength=self.strength), paramwise)

    def __call__(self, model: nn.Module) -> L2SPOptimWrapper:
        net = split_model(model)[1]
        try:
            modules = resolve_modules(net, list(self.modules))
        except (KeyError, ValueError) as exc:
            raise ValueError(f'optim_wrapper.paramwise_cfg.l2sp.modules: {exc.args[0]}') from None
        wrapper = super().__call__(model)
        seen: Dict[int, nn.Parameter] = {}
        for module in modules.values():
            for p in module.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        wrapper.anchored = list(seen.values())
        return wrapper
