"""The compared methods as data: what each run trains, and which settings its search covers.

Every method starts from the same pretrained *backbone* with a *fresh* decode head (standard init
for the baselines, zero predictors for DAFT and its integrated-LP+FT ablation) and gets the same
number of training iterations; LP-FT's two stages share that budget.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from daft_mm.core import get_recipe, recipe_name

__all__ = ['MethodSpec', 'Point', 'METHODS', 'ABLATIONS', 'COMPARED', 'BASELINES', 'AT_DAFT',
           'ALL', 'get_method', 'method_name', 'selected_methods', 'stage_budgets', 'describe']


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison.

    Attributes:
        name: the label in tables and plots.
        recipe: the ``DAFTModel`` method / core recipe (``daft_mm.core.RECIPES``).
        has_ratio: whether a head/backbone LR ratio is part of its setting.
        lp_first: LP-FT: a decode-head probe stage, then FT from it, within one budget.
        description: one line for the report.
        head_lr_mult: the stock ``paramwise_cfg.custom_keys={'head': dict(lr_mult=...)}``
            practice (every module named ``*head*`` at that multiple of the LR); None: one LR.
        l2sp: L2-SP instead of weight decay on the backbone (``Point.strength``).
        zero_init: False: DAFT without the zero-initialised predictors (an ablation).
        of_daft: not searched: runs DAFT's chosen setting, changed as ``ratio`` says (the
            paired ablations at DAFT's choice).
        ratio: with ``of_daft``: this head/backbone LR ratio instead of DAFT's.
        wise: WiSE-FT: not trained, mixed from the two ends of LP-FT's runs (:mod:`.wise`).
    """

    name: str
    recipe: str
    has_ratio: bool = False
    lp_first: bool = False
    description: str = ''
    head_lr_mult: Optional[float] = None
    l2sp: bool = False
    zero_init: bool = True
    of_daft: bool = False
    ratio: Optional[float] = None
    wise: bool = False


@dataclass(frozen=True)
class Point:
    """A setting of one method: backbone LR, head/backbone LR ratio, head scope, L2-SP
    strength."""

    lr: float
    ratio: Optional[float] = None
    scope: Optional[str] = None
    strength: Optional[float] = None

    def label(self) -> str:
        parts = [f'lr={self.lr:g}']
        if self.ratio is not None:
            parts.append(f'ratio={self.ratio:g}')
        if self.scope is not None:
            parts.append(f'head={self.scope}')
        if self.strength is not None:
            parts.append(f'l2sp={self.strength:g}')
        return ' '.join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'Point':
        return cls(lr=float(d['lr']), ratio=None if d.get('ratio') is None else float(d['ratio']),
                   scope=d.get('scope'),
                   strength=None if d.get('strength') is None else float(d['strength']))


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
#: What users of robust fine-tuning already have; a task asks for them (``compare.methods``).
BASELINES: Tuple[MethodSpec, ...] = (
    MethodSpec('FT, head at 10x', 'ft', head_lr_mult=10.0,
               description="FT with the stock custom_keys={'head': dict(lr_mult=10.)} "
               '(mmseg SETR configs): every *head* module at 10x the LR'),
    MethodSpec('L2-SP', 'ft', l2sp=True,
               description='FT with an L2 pull toward the pretrained backbone weights instead '
               'of weight decay on them (Li et al. 2018); strength and LR searched'),
    MethodSpec('WiSE-FT', 'ft', wise=True,
               description="LP-FT's two ends (after the probe, at the end) mixed in weight space "
               'at alpha, BN statistics re-estimated on ID train, alpha chosen on ID-val '
               '(Wortsman et al. 2022); no extra training'),
)
#: Paired ablations at DAFT's chosen setting (not searched).
AT_DAFT: Tuple[MethodSpec, ...] = (
    MethodSpec('DAFT w/o zero init', 'daft', has_ratio=True, zero_init=False, of_daft=True,
               description="DAFT's setting with the predictors at their standard init"),
    MethodSpec('DAFT at ratio 1', 'daft', has_ratio=True, of_daft=True, ratio=1.0,
               description="DAFT's setting with the head at the backbone's LR"),
)
#: Every row a comparison can have.
ALL: Tuple[MethodSpec, ...] = COMPARED + BASELINES + AT_DAFT


#: What the probe is on a detector: the backbone is what was pretrained, everything else is new.
_ON_DETECTORS = {
    'LP': 'backbone frozen (its BN in eval mode); the fresh neck and heads train (a two-stage '
          "detector's RPN and RoI heads on the frozen features)",
    'LP-FT': 'LP (backbone frozen, neck and heads train) for half the budget, then FT of '
             'everything from it for the other half',
}


def describe(spec: MethodSpec, kind: str = 'seg') -> str:
    """The report's line for ``spec`` on a segmentation (``'seg'``) or detection task."""
    return _ON_DETECTORS.get(spec.name, spec.description) if kind == 'det' else spec.description


def method_name(name: str) -> str:
    """The row label of a compared method, from any spelling of it: the label itself in any case
    (``'daft w/o conversion'``) or the recipe name configs and ``tools/train_cls.py`` use
    (``'daft-no-convert'``, ``'lp_ft'``). Unknown names raise ``KeyError`` with the choices."""
    by_recipe = {('lp-ft' if m.lp_first else m.recipe): m.name for m in COMPARED}
    labels = [m.name for m in ALL]
    exact = {label.lower(): label for label in labels}
    if str(name).strip().lower() in exact:
        return exact[str(name).strip().lower()]
    try:
        return by_recipe[recipe_name(name)]
    except KeyError:
        import difflib
        spellings = dict(by_recipe, **{label.lower(): label for label in labels})
        close = difflib.get_close_matches(str(name).strip().lower(), list(spellings), n=1)
        hint = f'did you mean {spellings[close[0]]!r}? ' if close else ''
        raise KeyError(f'unknown benchmark method {name!r}; {hint}choose one of '
                       f'{", ".join(map(repr, labels))} (or their recipe names '
                       f'{sorted(by_recipe)})') from None


def get_method(name: str) -> MethodSpec:
    """The compared method of ``name``, in any spelling :func:`method_name` accepts."""
    label = method_name(name)
    return next(spec for spec in ALL if spec.name == label)


def selected_methods(names: Tuple[str, ...] = (), only: Tuple[str, ...] = ()
                     ) -> Tuple[MethodSpec, ...]:
    """The rows of a comparison: ``names`` added to :data:`COMPARED` (which every comparison
    has), in :data:`ALL`'s order; ``only``: just these of them (the same choices on another
    backbone, say)."""
    wanted = {m.name for m in COMPARED} | {method_name(n) for n in names}
    if only:
        wanted &= {method_name(n) for n in only}
    return tuple(m for m in ALL if m.name in wanted)


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
