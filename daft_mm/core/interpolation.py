"""Weight-space interpolation of two fine-tuning endpoints (WiSE-FT, Wortsman et al., CVPR 2022),
the robust fine-tuning baseline the comparison runs next to DAFT: ``(1 - alpha) * start +
alpha * end``, tensor by tensor, for two state dicts of one architecture.

Why the BN statistics are re-estimated afterwards (:func:`mix_with_statistics`): the running
statistics of a mix are the mix of two sets of statistics, each measured for its own weights; the
mixed weights see activations that neither set describes. The re-estimate is the statistics pass
of BN conversion writing the statistics only (``convert_bn(keep_function=False)``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .conversion import ConversionReport, ForwardFn, convert_bn

__all__ = ['interpolate_states', 'mix_with_statistics']


def interpolate_states(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                       alpha: float) -> Dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end`` for every floating-point tensor; integer tensors
    (``num_batches_tracked``) come from ``end``. ``alpha`` 0 and 1 give the endpoints exactly.
    Two state dicts of different architectures (other keys or shapes) are refused, naming them."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha!r}')
    missing, extra = sorted(set(end) - set(start)), sorted(set(start) - set(end))
    shapes = [f'{k} {tuple(start[k].shape)} vs {tuple(end[k].shape)}' for k in start
              if k in end and start[k].shape != end[k].shape]
    if missing or extra or shapes:
        parts = [f'only in the end: {missing[:3]}' if missing else '',
                 f'only in the start: {extra[:3]}' if extra else '',
                 f'other shapes: {shapes[:3]}' if shapes else '']
        raise ValueError('the two checkpoints are not of one architecture ('
                         + '; '.join(p for p in parts if p) + '): WiSE-FT mixes the two ends of '
                         'one fine-tuning run')
    mixed = {}
    for key, b in end.items():
        a = start[key]
        if not torch.is_floating_point(b) or alpha == 1.0:
            mixed[key] = b.detach().clone()
        elif alpha == 0.0:
            mixed[key] = a.detach().clone()
        else:
            mixed[key] = torch.lerp(a.detach().to(b.dtype), b.detach(), float(alpha))
    return mixed


def mix_with_statistics(model: nn.Module, start: Mapping[str, torch.Tensor],
                        end: Mapping[str, torch.Tensor], alpha: float, batches: Any, *,
                        forward: Optional[ForwardFn] = None, max_batches: Optional[int] = None
                        ) -> Optional[ConversionReport]:
    """Load the ``alpha`` mix into ``model`` (strictly), then re-estimate the running statistics
    of its BatchNorm layers on ``batches`` (ID training data). Returns the statistics report
    (None for a model without BatchNorm)."""
    model.load_state_dict(interpolate_states(start, end, alpha))
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    kwargs = {} if forward is None else {'forward': forward}
    return convert_bn(model, batches, max_batches=max_batches, keep_function=False, **kwargs)
