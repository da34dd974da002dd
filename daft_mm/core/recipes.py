"""The four fine-tuning methods as data: FT, LP, LP-FT and DAFT.

A method is a sequence of stages, each stating which of the core operations it uses.
Keeping this as data (not as branches scattered over training loops) means the
classification API and the OpenMMLab layer read the same definition of each method,
and a variant is one ``dataclasses.replace`` away.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ['DAFT_HEAD_LR_MULT', 'DAFT_HEAD_SCOPE', 'HEAD_SCOPES', 'CONVERT_SCOPES', 'FineTuneStage',
           'FineTuneRecipe', 'RECIPES', 'RECIPE_ALIASES', 'recipe_name', 'get_recipe']

#: Which modules train at the head LR: ``'predictors'``, the final predictor layers only (they
#: are also what DAFT zeroes), or ``'new_modules'``, every module that is new to the pretrained
#: model (with an ImageNet-style backbone: decode and auxiliary heads, necks, detection heads).
#: Zero-init always applies to the final predictors only.
HEAD_SCOPES = ('predictors', 'new_modules')
#: Which BatchNorm layers BN conversion rewrites: ``'pretrained'``, those whose weights came from
#: pretrained weights (conversion keeps a *pretrained* function; a fresh head's BN has none to
#: keep, and "keeping" its 0/1 statistics would switch its normalisation off), or ``'all'``
#: (every BN layer: the behaviour before the rule, kept for comparison).
CONVERT_SCOPES = ('pretrained', 'all')


@dataclass(frozen=True)
class FineTuneStage:
    """What one training stage does before and while it trains.

    Attributes:
        name: short label for logs (``'lp'``, ``'ft'``).
        convert_bn: run ``convert_bn`` on the target training data before training.
        zero_init_head: zero the final predictor(s) before training.
        freeze_feature_extractor: train only the head parameters.
        bn_train: BatchNorm layers in train mode (batch statistics, running stats
            updated); ``False`` keeps them in eval mode, as LP requires.
        head_lr_mult: head learning rate = base learning rate x this.
        head_scope: which modules are the head for ``head_lr_mult`` and LP's freezing, one
            of :data:`HEAD_SCOPES`.
        convert_scope: which BN layers ``convert_bn`` rewrites, one of :data:`CONVERT_SCOPES`;
            the others stay exactly as initialised and train as in FT.
    """

    name: str
    convert_bn: bool = False
    zero_init_head: bool = False
    freeze_feature_extractor: bool = False
    bn_train: bool = True
    head_lr_mult: float = 1.0
    head_scope: str = 'predictors'
    convert_scope: str = 'pretrained'

    def __post_init__(self) -> None:
        if not self.head_lr_mult > 0:
            raise ValueError(f'head_lr_mult must be > 0, got {self.head_lr_mult!r}')
        if self.head_scope not in HEAD_SCOPES:
            raise ValueError(f'head_scope must be one of {HEAD_SCOPES}, got {self.head_scope!r}')
        if self.convert_scope not in CONVERT_SCOPES:
            raise ValueError(f'convert_scope must be one of {CONVERT_SCOPES}, got '
                             f'{self.convert_scope!r}')


@dataclass(frozen=True)
class FineTuneRecipe:
    """A named fine-tuning method: its stages, run in order on the same model."""

    name: str
    stages: tuple[FineTuneStage, ...]
    description: str = ''

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f'recipe {self.name!r} has no stages')

    @property
    def uses_bn_conversion(self) -> bool:
        return any(stage.convert_bn for stage in self.stages)

    def stage_iterations(self, budget: int, lp_fraction: float = 0.5) -> tuple[int, ...]:
        """Iterations of each stage, summing to ``budget``: every method gets the same budget,
        and the stages before the last (LP-FT's probe) share ``lp_fraction`` of it."""
        n = len(self.stages)
        if budget < n:
            raise ValueError(f'{self.name} needs a budget of >= {n} iterations ({n} stages), '
                             f'got {budget}')
        if n == 1:
            return (budget, )
        if not 0 < lp_fraction < 1:
            raise ValueError(f'lp_fraction must be in (0, 1), got {lp_fraction}')
        early = min((budget - 1) // (n - 1), max(1, round(budget * lp_fraction / (n - 1))))
        return (early, ) * (n - 1) + (budget - early * (n - 1), )


_LP = FineTuneStage('lp', freeze_feature_extractor=True, bn_train=False)
_FT = FineTuneStage('ft')

#: DAFT's default head LR multiplier. The method only needs it "far above" the
#: backbone's: the zero head must fit quickly (the LP part) while the backbone moves
#: slowly (the FT part). Tune it per task like any LR: both embedded benchmarks chose 10 on
#: ID-val (classification; segmentation at 300 iterations, once DAFT converted only the
#: pretrained BN layers: docs/benchmark.md).
DAFT_HEAD_LR_MULT = 10.0
#: DAFT's default head: every module new to the pretrained backbone. On the embedded
#: segmentation benchmark it beat the final predictors alone at every backbone LR / ratio that
#: trained (ID-val); for a classifier whose only new layer is ``fc`` the two are the same.
DAFT_HEAD_SCOPE = 'new_modules'

#: Read-only: a variant is a new recipe (``dataclasses.replace``), not an edit of these.
RECIPES: Mapping[str, FineTuneRecipe] = MappingProxyType({
    'ft': FineTuneRecipe(
        'ft', (_FT,),
        'fine-tune everything with one learning rate; head keeps its standard init'),
    'lp': FineTuneRecipe(
        'lp', (_LP,),
        'linear probing: backbone frozen, BatchNorm in eval mode, only the head trains'),
    'lp-ft': FineTuneRecipe(
        'lp-ft', (_LP, _FT),
        'LP, then FT of everything starting from the probed head'),
    'daft': FineTuneRecipe(
        'daft',
        (FineTuneStage('daft', convert_bn=True, zero_init_head=True,
                       head_lr_mult=DAFT_HEAD_LR_MULT, head_scope=DAFT_HEAD_SCOPE),),
        'BN conversion on the target data, then integrated LP+FT: zero-initialised head '
        'with a learning rate far above the backbone\'s, BatchNorm in train mode'),
    # The two halves of DAFT alone, for ablations.
    'daft-no-convert': FineTuneRecipe(
        'daft-no-convert',
        (FineTuneStage('daft-no-convert', zero_init_head=True, head_lr_mult=DAFT_HEAD_LR_MULT,
                       head_scope=DAFT_HEAD_SCOPE),),
        'integrated LP+FT alone: zero-initialised head at a high LR, no BN conversion'),
    'daft-convert-only': FineTuneRecipe(
        'daft-convert-only', (FineTuneStage('daft-convert-only', convert_bn=True),),
        'BN conversion alone, then FT with one LR and the head\'s standard init'),
})


#: Other spellings users meet for the same recipes: the benchmark's row labels ("DAFT w/o
#: conversion", "conversion only") and short forms. Keys are normalised by :func:`recipe_name`.
RECIPE_ALIASES: Mapping[str, str] = MappingProxyType({
    'lpft': 'lp-ft',
    'daft-w/o-conversion': 'daft-no-convert', 'daft-without-conversion': 'daft-no-convert',
    'no-convert': 'daft-no-convert',
    'conversion-only': 'daft-convert-only', 'convert-only': 'daft-convert-only',
})


def _normalise(name: str) -> str:
    return '-'.join(str(name).strip().lower().replace('_', ' ').replace('-', ' ').split())


def recipe_name(name: str) -> str:
    """The recipe key of ``name``, in any of the spellings the tools and reports use: case,
    ``_``, spaces and ``-`` are ignored and :data:`RECIPE_ALIASES` are accepted
    (``'DAFT w/o conversion'`` and ``'daft_no_convert'`` are both ``'daft-no-convert'``). An
    unknown name raises ``KeyError`` naming the closest recipe and every choice."""
    key = _normalise(name)
    key = RECIPE_ALIASES.get(key, key)
    if key in RECIPES:
        return key
    import difflib
    close = difflib.get_close_matches(key, list(RECIPES) + list(RECIPE_ALIASES), n=1)
    hint = (f'did you mean {RECIPE_ALIASES.get(close[0], close[0])!r}? ' if close else '')
    raise KeyError(f'unknown fine-tuning method {name!r}; {hint}choose one of {sorted(RECIPES)}')


def get_recipe(name: str) -> FineTuneRecipe:
    """The recipe for ``name`` in any spelling :func:`recipe_name` accepts (``'LP_FT'``)."""
    return RECIPES[recipe_name(name)]
