"""DAFT's preparation of one model, as data and one function every front end calls.

A :class:`Plan` names what the preparation changes: the BN layers conversion rewrites (and those it
leaves as initialised), the final predictors that start at zero (with the prior bias of a
sigmoid/focal classifier), and the head trained at ``head_lr_mult`` x the backbone's LR.
:func:`prepare` carries it out: one statistics pass, then the zero predictors. The mm hook, the
classification API, ``doctor`` and the distortion analysis all call :func:`prepare`, so the order
and the checks are written once.

Why a plan first: every name is checked when the plan is made (:func:`make_plan`), before any
data is read or any weight changes, and a failing preparation leaves the model as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from .conversion import ConversionReport, ForwardFn, convert_bn, split_batchnorms
from .heads import find_predictors, head_modules as scoped_head_modules, zero_init_predictors

__all__ = ['Plan', 'Preparation', 'make_plan', 'prepare']


@dataclass(frozen=True)
class Plan:
    """What DAFT's preparation does to one model (module paths of that model).

    Attributes:
        convert: BN layers conversion rewrites (empty: no conversion).
        left_new: BN layers left exactly as initialised (new to the pretrained model).
        predictors: final predictors zeroed when ``zero_init`` (always inside the head).
        priors: ``(predictor, prior bias)`` pairs of sigmoid/focal classifiers (a number or a
            tensor per output); the other predictors start at bias 0.
        zero_init: zero the predictors.
        head_modules: modules trained at ``head_lr_mult`` x the base LR.
        head_lr_mult: the head/backbone LR ratio (1: one LR).
    """

    convert: Tuple[str, ...] = ()
    left_new: Tuple[str, ...] = ()
    predictors: Tuple[str, ...] = ()
    priors: Tuple[Tuple[str, Any], ...] = ()
    zero_init: bool = True
    head_modules: Tuple[str, ...] = ()
    head_lr_mult: float = 1.0

    def to_dict(self) -> Dict[str, Any]:
        return {'convert': list(self.convert), 'left_new': list(self.left_new),
                'predictors': list(self.predictors),
                'priors': {k: v.tolist() if hasattr(v, 'tolist') else v for k, v in self.priors},
                'zero_init': self.zero_init, 'head_modules': list(self.head_modules),
                'head_lr_mult': self.head_lr_mult}


@dataclass
class Preparation:
    """What :func:`prepare` did: the conversion report (None when nothing was converted) and the
    zeroed predictors."""

    report: Optional[ConversionReport]
    zeroed: List[str] = field(default_factory=list)


def make_plan(model: nn.Module, *, pretrained: Optional[Iterable[str]],
              predictors: Sequence[str], convert: bool = True, zero_init: bool = True,
              convert_scope: str = 'pretrained', head_scope: str = 'predictors',
              head_lr_mult: float = 1.0, priors: Optional[Mapping[str, Any]] = None) -> Plan:
    """The plan of one model, every name checked now: the BN layers of the ``pretrained``
    modules are converted (``convert_scope='all'``: every BN layer), the rest left as
    initialised; a layer with running statistics that conversion cannot treat as BatchNorm (a
    tracked ``InstanceNorm``) is refused here, naming it. ``head_scope``: ``'predictors'`` or
    ``'new_modules'`` (every top-level module outside ``pretrained``)."""
    pretrained = list(pretrained or ())
    converted, fresh = split_batchnorms(model, pretrained, convert_scope) if convert else ([], [])
    names = list(find_predictors(model, list(predictors))) if predictors else []
    heads = (scoped_head_modules(model, names, head_scope, pretrained or ['backbone'])
             if head_lr_mult != 1.0 else [])
    return Plan(convert=tuple(converted), left_new=tuple(fresh), predictors=tuple(names),
                priors=tuple((priors or {}).items()), zero_init=zero_init,
                head_modules=tuple(heads), head_lr_mult=float(head_lr_mult))


def prepare(model: nn.Module, batches: Any, plan: Plan, *,
            forward: Optional[ForwardFn] = None, max_batches: Optional[int] = None,
            var_mode: str = 'batch', skip_incompatible: bool = False,
            progress: Optional[Callable[[int], None]] = None) -> Preparation:
    """DAFT's preparation of ``model`` as ``plan`` says: BN conversion of ``plan.convert`` over
    one pass of ``batches`` (every rank calls this under ``torch.distributed``; a rank without a
    batch still joins the pooling), then the zero predictors at their prior bias. The predictors
    are checked before the pass, so a failing preparation leaves the model as it was."""
    if plan.zero_init and plan.predictors:
        find_predictors(model, list(plan.predictors))  # refuses before anything changes
    report = None
    if plan.convert:
        kwargs = {} if forward is None else {'forward': forward}
        report = convert_bn(model, batches, max_batches=max_batches, var_mode=var_mode,
                            modules=list(plan.convert), skip_incompatible=skip_incompatible,
                            progress=progress, **kwargs)
        report.left_as_initialised = list(plan.left_new)
    zeroed: List[str] = []
    if plan.zero_init and plan.predictors:
        zeroed = zero_init_predictors(model, list(plan.predictors), dict(plan.priors))
    return Preparation(report, zeroed)
