"""How far fine-tuning moved a pretrained network: feature similarity and per-layer change.

DAFT claims to distort the pretrained network less than plain fine-tuning. Two views make that
measurable, both as small pure functions over tensors and state dicts (torch + stdlib only):

* :func:`feature_similarity` compares what two networks compute on the same images: cosine and
  L2 distance of globally pooled features per image, and for dense ``(N, C, H, W)`` features the
  cosine of every pixel's channel vector.
* :func:`relative_change` compares parameters: ``||theta - theta0|| / ||theta0||`` for every conv
  weight and BN weight / bias / running mean / running var, in network order, with a stage label
  (``stem``, ``layer1`` .. ``layer4``) per layer so that changes can be read along the depth.

Conventions that are easy to get wrong, fixed here once:

* Cosine of two zero vectors is 1 (nothing differs), of one zero and one non-zero vector 0. ReLU
  features can have all-zero pixels; a clamped-epsilon cosine would call identical zero pixels
  "orthogonal".
* Relative change against a zero-norm reference (a zero-initialised bias, say) is undefined: the
  row keeps the absolute change, ``relative`` is ``0.0`` if nothing moved and ``NaN`` otherwise,
  and ``zero_reference`` is set. Means over layers skip NaN rows and say how many they skipped.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    'QUANTITIES', 'FeatureSimilarity', 'LayerChange', 'ChangeReport', 'feature_similarity',
    'pairwise_cosine', 'relative_change'
]

#: The parameter kinds :func:`relative_change` measures, in the order reports list them.
QUANTITIES: Tuple[str, ...] = ('conv_weight', 'bn_weight', 'bn_bias', 'bn_running_mean',
                               'bn_running_var')
_BN_SUFFIX = {'weight': 'bn_weight', 'bias': 'bn_bias', 'running_mean': 'bn_running_mean',
              'running_var': 'bn_running_var'}


# ----------------------------------------------------------------------------------- features
def pairwise_cosine(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Cosine similarity along ``dim`` with explicit zero-vector rules (both zero: 1, one: 0).

    Computed in float64; exactly equal vectors give exactly 1 (rounding would otherwise give
    1 - 1e-16, which makes "unchanged" hard to assert and to read off a histogram).
    """
    if a.shape != b.shape:
        raise ValueError(f'cannot compare features of shapes {tuple(a.shape)} and {tuple(b.shape)}')
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=dim), b.norm(dim=dim)
    dot = (a * b).sum(dim=dim)
    denom = na * nb
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.zeros_like(dot))
    cos = torch.where((a == b).all(dim=dim), torch.ones_like(cos), cos)  # incl. both zero
    return cos.clamp(-1.0, 1.0)


@dataclass
class FeatureSimilarity:
    """Per-image similarity of two feature batches.

    Attributes:
        cosine: ``(N,)`` cosine of globally average-pooled features.
        l2: ``(N,)`` Euclidean distance of the pooled features.
        pixel_cosine: ``(N, *spatial)`` per-position channel cosine, or ``None`` for ``(N, C)``.
    """

    cosine: torch.Tensor
    l2: torch.Tensor
    pixel_cosine: Optional[torch.Tensor] = None

    def means(self) -> Dict[str, float]:
        """Batch means as plain floats (pixel cosine averaged over all pixels of all images)."""
        out = {'cosine': self.cosine.mean().item(), 'l2': self.l2.mean().item()}
        if self.pixel_cosine is not None:
            out['pixel_cosine'] = self.pixel_cosine.mean().item()
        return out


def feature_similarity(f0: torch.Tensor, f1: torch.Tensor) -> FeatureSimilarity:
    """Compare reference features ``f0`` with features ``f1`` of the same images.

    ``(N, C)`` features are compared as they are; ``(N, C, *spatial)`` features are average-pooled
    over the spatial dims for the per-image numbers and compared pixel by pixel as well.
    """
    if f0.shape != f1.shape:
        raise ValueError(f'feature shapes differ: {tuple(f0.shape)} vs {tuple(f1.shape)}; both '
                         'networks must see the same images and have the same architecture')
    if f0.dim() < 2:
        raise ValueError(f'features must be (N, C) or (N, C, ...), got shape {tuple(f0.shape)}')
    f0, f1 = f0.detach().double(), f1.detach().double()
    if f0.dim() == 2:
        p0, p1, pixel = f0, f1, None
    else:
        spatial = tuple(range(2, f0.dim()))
        p0, p1 = f0.mean(dim=spatial), f1.mean(dim=spatial)
        pixel = pairwise_cosine(f0, f1, dim=1)
    return FeatureSimilarity(cosine=pairwise_cosine(p0, p1, dim=1), l2=(p1 - p0).norm(dim=1),
                             pixel_cosine=pixel)


# --------------------------------------------------------------------------------- parameters
@dataclass
class LayerChange:
    """Change of one parameter tensor.

    ``relative`` is ``abs_change / ref_norm``; when ``ref_norm == 0`` (``zero_reference``) it is
    ``0.0`` if the tensor did not move and ``NaN`` if it did (read ``abs_change`` instead).
    """

    name: str  # module name without the prefix, e.g. 'layer1.0.bn1'
    stage: str  # 'stem', 'layer1', ..., or 'post' for anything after the last stage
    quantity: str  # one of QUANTITIES
    index: int  # position of the module along the network (same for a BN's four rows)
    ref_norm: float
    abs_change: float
    relative: float
    zero_reference: bool = False


@dataclass
class ChangeReport:
    """Per-layer relative change, in network order, with stage and quantity summaries."""

    layers: List[LayerChange] = field(default_factory=list)
    stages: List[str] = field(default_factory=list)  # in network order

    def rows(self, quantity: str) -> List[LayerChange]:
        return [row for row in self.layers if row.quantity == quantity]

    def quantities(self) -> List[str]:
        present = {row.quantity for row in self.layers}
        return [q for q in QUANTITIES if q in present]

    def _mean(self, rows: Sequence[LayerChange]) -> Tuple[float, int]:
        values = [row.relative for row in rows if not math.isnan(row.relative)]
        return (sum(values) / len(values) if values else math.nan), len(rows) - len(values)

    def quantity_means(self) -> Dict[str, float]:
        """Unweighted mean over layers of the relative change, per quantity (NaN rows skipped)."""
        return {q: self._mean(self.rows(q))[0] for q in self.quantities()}

    def stage_means(self) -> Dict[str, Dict[str, float]]:
        """quantity -> stage -> unweighted mean relative change over that stage's layers."""
        out: Dict[str, Dict[str, float]] = {}
        for q in self.quantities():
            rows = self.rows(q)
            out[q] = {s: self._mean([r for r in rows if r.stage == s])[0]
                      for s in self.stages if any(r.stage == s for r in rows)}
        return out

    def skipped_in_means(self) -> List[str]:
        """'name:quantity' of rows left out of the means (moved away from a zero reference)."""
        return [f'{r.name}:{r.quantity}' for r in self.layers if math.isnan(r.relative)]

    def to_dict(self) -> Dict[str, Any]:
        return {'layers': [asdict(row) for row in self.layers], 'stages': list(self.stages),
                'quantity_means': self.quantity_means(), 'stage_means': self.stage_means(),
                'skipped_in_means': self.skipped_in_means()}


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str,
                  what: str) -> Dict[str, torch.Tensor]:
    if not prefix:
        return dict(state)
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        heads = sorted({k.split('.', 1)[0] + '.' for k in state})[:8]
        raise ValueError(f'{what} has no key starting with prefix {prefix!r}; its keys start with '
                         f'{heads}. Pass the matching prefix (or prefix="" for a bare backbone).')
    return out


def _stage_of(module: str, pattern: re.Pattern) -> Optional[str]:
    match = pattern.search(module)
    return match.group(1) if match else None


def relative_change(state0: Mapping[str, torch.Tensor],
                    state1: Mapping[str, torch.Tensor],
                    *,
                    prefix: str = '',
                    stage_pattern: str = r'(?:^|\.)(layer\d+)(?:\.|$)') -> ChangeReport:
    """``||theta1 - theta0|| / ||theta0||`` for every conv weight and BN parameter/statistic.

    Args:
        state0: reference state dict (pretrained, or the model right after BN conversion).
        state1: the state dict to compare, same architecture.
        prefix: only keys under this prefix are compared, and it is stripped from the names
            (``'backbone.'`` for a whole mmseg/mmdet model).
        stage_pattern: regex whose group 1 names a module's stage. Modules before the first match
            are ``stem``, modules after the last stage (e.g. a classifier) are ``post``.

    A BN layer is a module with a ``running_mean`` entry; a conv weight is any other ``weight``
    with 3+ dims. Order follows ``state0`` (registration order: stem, then the stages).
    """
    s0 = _strip_prefix(state0, prefix, 'state0')
    s1 = _strip_prefix(state1, prefix, 'state1')
    pattern = re.compile(stage_pattern)

    # Collect (module, suffix, quantity) in state0 order.
    entries: List[Tuple[str, str, str]] = []
    bn_modules = {k[:-len('.running_mean')] for k in s0 if k.endswith('.running_mean')}
    bn_modules |= {'' for k in s0 if k == 'running_mean'}
    for key, value in s0.items():
        module, _, suffix = key.rpartition('.')
        if module in bn_modules:
            if suffix in _BN_SUFFIX:
                entries.append((module, suffix, _BN_SUFFIX[suffix]))
        elif suffix == 'weight' and value.dim() >= 3:
            entries.append((module, suffix, 'conv_weight'))
    if not entries:
        raise ValueError('no conv weight or BatchNorm entry found in state0'
                         + (f' under prefix {prefix!r}' if prefix else '')
                         + '; is this a CNN state dict?')

    missing = [f'{m}.{s}'.lstrip('.') for m, s, _ in entries if f'{m}.{s}'.lstrip('.') not in s1]
    if missing:
        hint = difflib.get_close_matches(missing[0], list(s1), n=3)
        close = f'; close names in state1: {hint}' if hint else ''
        raise KeyError(f'state1 lacks {len(missing)} of the {len(entries)} compared entries '
                       f'(first: {missing[:5]}){close}. '
                       'Both states must come from the same architecture (and the same prefix).')

    report = ChangeReport()
    module_index: Dict[str, int] = {}
    stage_seen: List[str] = []
    last_stage: Optional[str] = None
    for module, suffix, quantity in entries:
        key = f'{module}.{suffix}'.lstrip('.')
        t0, t1 = s0[key], s1[key]
        if t0.shape != t1.shape:
            raise ValueError(f'{key}: shape {tuple(t0.shape)} in state0 but {tuple(t1.shape)} in '
                             'state1; the two states come from different architectures')
        stage = _stage_of(module, pattern)
        if stage is None:
            stage = 'stem' if last_stage is None else 'post'
        else:
            last_stage = stage
        if stage not in stage_seen:
            stage_seen.append(stage)
        index = module_index.setdefault(module, len(module_index))
        t0d, t1d = t0.detach().double().cpu(), t1.detach().double().cpu()
        ref_norm = t0d.norm().item()
        abs_change = (t1d - t0d).norm().item()
        if ref_norm > 0:
            relative, zero_ref = abs_change / ref_norm, False
        else:
            relative, zero_ref = (0.0 if abs_change == 0 else math.nan), True
        report.layers.append(LayerChange(module, stage, quantity, index, ref_norm, abs_change,
                                         relative, zero_ref))
    report.stages = stage_seen
    return report
