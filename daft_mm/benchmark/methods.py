"""The compared methods as data: what each run trains, and which settings its search covers.

Every method starts from the same pretrained *backbone* with a *fresh* decode head (standard init
for the baselines, zero predictors for DAFT and its integrated-LP+FT ablation) and gets the same
number of training iterations; LP-FT's two stages share that budget.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from daft_mm.core import get_recipe, recipe_name

__all__ = ['MethodSpec', 'Point', 'METHODS', 'ABLATIONS', 'COMPARED', 'get_method',
           'method_name', 'stage_budgets']


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison.

    Attributes:
        name: the label in tables and plots.
        recipe: the ``DAFTModel`` method / core recipe (``daft_mm.core.RECIPES``).
        has_ratio: whether a head/backbone LR ratio is part of its setting.
        lp_first: LP-FT: a decode-head probe stage, then FT from it, within one budget.
        description: one line for the report.
    """

    name: str
    recipe: str
    has_ratio: bool = False
    lp_first: bool = False
    description: str = ''


@dataclass(frozen=True)
class Point:
    """A setting of one method: backbone LR, head/backbone LR ratio, head scope."""

    lr: float
    ratio: Optional[float] = None
    scope: Optional[str] = None

    def label(self) -> str:
        parts = [f'lr={self.lr:g}']
        if self.ratio is not None:
            parts.append(f'ratio={self.ratio:g}')
        if self.scope is not None:
            parts.append(f'head={self.scope}')
        return ' '.join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'Point':
        return cls(lr=float(d['lr']), ratio=None if d.get('ratio') is None else float(d['ratio']),
                   scope=d.get('scope'))


METHODS: Tuple[MethodSpec, ...] = (
    MethodSpec('FT', 'ft',
               description='fine-tune everything at one LR; fresh head, standard init'),
    MethodSpec('LP', 'lp',
               description='decode-head probe: backbone frozen (BN eval), the fresh decode and '
               'auxiliary heads train (not a linear probe: the head has several layers)'),
    MethodSpec('LP-FT', 'ft', lp_first=True,
               description='the decode-head probe for half the budget, then FT of everything '
               'from it for the other half'),
    MethodSpec('DAFT', 'daft', has_ratio=True,
               description='BN conversion on the ID training data, zero predictors, the head at '
               'ratio x the backbone LR, BN in train mode'),
)
ABLATIONS: Tuple[MethodSpec, ...] = (
    MethodSpec('DAFT w/o conversion', 'daft-no-convert', has_ratio=True,
               description='integrated LP+FT alone: zero predictors and the head ratio, BN '
               'statistics as pretrained'),
    MethodSpec('conversion only', 'daft-convert-only',
               description='BN conversion alone, then FT at one LR with the standard head init'),
)
COMPARED: Tuple[MethodSpec, ...] = METHODS + ABLATIONS


def method_name(name: str) -> str:
    """The row label of a compared method, from any spelling of it: the label itself in any case
    (``'daft w/o conversion'``) or the recipe name configs and ``tools/train_cls.py`` use
    (``'daft-no-convert'``, ``'lp_ft'``). Unknown names raise ``KeyError`` with the choices."""
    by_recipe = {('lp-ft' if m.lp_first else m.recipe): m.name for m in COMPARED}
    try:
        return by_recipe[recipe_name(name)]
    except KeyError:
        import difflib
        labels = [m.name for m in COMPARED]
        spellings = dict(by_recipe, **{label.lower(): label for label in labels})
        close = difflib.get_close_matches(str(name).strip().lower(), list(spellings), n=1)
        hint = f'did you mean {spellings[close[0]]!r}? ' if close else ''
        raise KeyError(f'unknown benchmark method {name!r}; {hint}choose one of '
                       f'{", ".join(map(repr, labels))} (or their recipe names '
                       f'{sorted(by_recipe)})') from None


def get_method(name: str) -> MethodSpec:
    """The compared method of ``name``, in any spelling :func:`method_name` accepts."""
    label = method_name(name)
    return next(spec for spec in COMPARED if spec.name == label)


def stage_budgets(spec: MethodSpec, budget: int, lp_fraction: float = 0.5) -> Dict[str, int]:
    """Iterations per training stage; they always sum to ``budget`` (equal budgets)."""
    if budget < 1:
        raise ValueError(f'the iteration budget must be >= 1, got {budget}')
    if not spec.lp_first:
        return {spec.recipe: budget}
    if budget < 2:
        raise ValueError(f'{spec.name} needs a budget of >= 2 iterations (two stages)')
    lp, ft = get_recipe('lp-ft').stage_iterations(budget, lp_fraction)
    return {'lp': lp, 'ft': ft}
