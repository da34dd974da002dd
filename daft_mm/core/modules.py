"""Two primitives every part of DAFT needs, each written once: which layers are BatchNorm, and
putting a model's train/eval flags back exactly as they were.

Why duck typing for BatchNorm: mmcv's ``MMSyncBN`` is not a ``_BatchNorm`` subclass, yet it keeps
running statistics and normalises like one. Conversion, LP's BN freezing and the start-up checks
must agree on what is a BN layer, or LP would leave an ``MMSyncBN`` training while conversion
rewrites it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['BN_INTERFACE', 'has_running_stats', 'not_batchnorm_reason', 'is_batchnorm',
           'kept_modes']

#: What a BN-like layer offers: per-channel running statistics over dim 1, an ``eps``, a channel
#: count and (possibly absent) affine weight and bias.
BN_INTERFACE = ('running_mean', 'running_var', 'eps', 'num_features', 'affine', 'weight', 'bias')


def has_running_stats(module: nn.Module) -> bool:
    """A ``_BatchNorm``, or any layer holding ``running_mean`` and ``running_var`` tensors."""
    return isinstance(module, _BatchNorm) or (
        isinstance(getattr(module, 'running_mean', None), torch.Tensor)
        and isinstance(getattr(module, 'running_var', None), torch.Tensor))


def not_batchnorm_reason(module: nn.Module) -> Optional[str]:
    """Why a layer with running statistics does not behave as a BatchNorm, or None if it does."""
    if isinstance(module, _BatchNorm):
        return None
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return ('an InstanceNorm normalises each sample by its own statistics in train mode; its '
                'running statistics are not what fine-tuning uses')
    missing = [attr for attr in BN_INTERFACE if not hasattr(module, attr)]
    if missing:
        return f'it keeps running statistics but has no {missing}'
    if module.running_mean.dim() != 1 or module.running_mean.numel() != module.num_features:
        return 'its running statistics are not one value per channel'
    return None


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm by type or by interface (mmcv's ``MMSyncBN``); never an InstanceNorm."""
    return has_running_stats(module) and not_batchnorm_reason(module) is None


@contextmanager
def kept_modes(modules: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """Restores the train/eval flag of every submodule on exit, whatever happened inside.

    ``model.train(mode)`` would not do: it resets every submodule, undoing the eval mode that
    ``norm_eval``, LP's frozen BN or a frozen stage set on purpose.
    """
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    saved = [(m, m.training) for root in roots for m in root.modules()]
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag
