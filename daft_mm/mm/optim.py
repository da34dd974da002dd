"""The DAFT plan as parameter groups and LR schedules: the optimizer is built once, by a
registered constructor, and the dumped config says what ran.

* :class:`DAFTOptimWrapperConstructor` (``optim_wrapper.constructor``): decides the plan
  (:func:`daft_mm.mm.plan.decide_plan`) when the Runner builds the optimizer, gives the head
  ``daft_head_lr_mult`` x the base LR through ``paramwise_cfg.custom_keys`` and hands the plan to
  ``DAFTHook`` on the wrapper it builds (``optim_wrapper.daft_plan``).
* :class:`PolyLRGroupFloors`: ``PolyLR`` whose ``eta_min`` is a floor per parameter group
  (``eta_min`` x the group's LR / base LR), so the head/backbone ratio holds to the end; stock
  schedules (``eta_min=1e-4``) otherwise pull every group to one LR.
* :func:`complete_daft_config`: what a DAFT config gets when it is loaded (``daft_mm.mm.cli.
  load_config``, so ``tools/train.py`` and ``tools/compare.py``): the constructor and the final
  ``daft_*`` keys in ``optim_wrapper.paramwise_cfg.daft``, and per-group floors in
  ``param_scheduler``. The fragment cannot set ``optim_wrapper`` itself: mmengine refuses a key two
  bases define, and every stock base defines it.

Why mmpretrain's habit (``LearningRateDecayOptimWrapperConstructor``): the Runner builds the
optimizer and its schedulers once; a hook that rebuilds them after the fact leaves a dumped config
that says something other than what trained.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.optim.scheduler import CosineAnnealingLR, CosineRestartLR, PolyLR
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, PARAM_SCHEDULERS
from torch import nn

from daft_mm.core import resolve_modules

from .plan import DAFTPlan, decide_plan
from .settings import (CONVERT_MODULES_KEY, HEAD_MODULES_KEY, LR_MULT_KEY, PREDICTORS_KEY,
                       hook_config, is_daft_config)

__all__ = ['CONSTRUCTOR', 'DAFTOptimWrapperConstructor', 'PolyLRGroupFloors', 'daft_settings',
           'complete_daft_config', 'group_floors', 'head_lr_cfg', 'check_lr_floors', 'effective_lrs',
           'check_head_lr', 'describe_lrs']

CONSTRUCTOR = 'DAFTOptimWrapperConstructor'
_CUSTOM = 'optim_wrapper.paramwise_cfg.custom_keys'
#: the settings the constructor reads, and the top-level key each comes from
_KEYS = {'predictors': PREDICTORS_KEY, 'head_lr_mult': LR_MULT_KEY,
         'head_modules': HEAD_MODULES_KEY, 'convert_modules': CONVERT_MODULES_KEY}
_HOOK_ARGS = ('predictors', 'convert', 'zero_init', 'modules')


def _plain(value: Any) -> Any:
    return value.to_dict() if hasattr(value, 'to_dict') else (
        list(value) if isinstance(value, tuple) else value)


def daft_settings(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """What the constructor needs of the final config: the ``daft_*`` keys (under short names),
    ``DAFTHook``'s plan arguments and the ``load_from`` a fresh run starts from."""
    hook = hook_config(cfg) or {}
    settings = {short: _plain(cfg.get(key)) for short, key in _KEYS.items()}
    settings['hook'] = {k: _plain(hook[k]) for k in _HOOK_ARGS if k in hook}
    settings['load_from'] = None if cfg.get('resume') else cfg.get('load_from')
    return settings


class PolyLRGroupFloors(PolyLR):
    """``PolyLR`` with ``eta_min`` as a floor per parameter group: ``eta_min`` x the group's LR
    over the base LR (the optimizer's ``lr``). With one LR for every group it is ``PolyLR``."""

    def __init__(self, optimizer: Any, *args: Any, eta_min: float = 0., **kwargs: Any) -> None:
        super().__init__(optimizer, *args, eta_min=eta_min, **kwargs)
        base = _base_lr(self)
        self.eta_mins = [eta_min * value / base for value in self.base_values]

    def _get_value(self) -> List[float]:
        groups = self.optimizer.param_groups
        if self.last_step == 0:
            return [group[self.param_name] for group in groups]
        decay = (1 - 1 / (self.total_iters - self.last_step + 1))**self.power
        return [(group[self.param_name] - floor) * decay + floor
                for group, floor in zip(groups, self.eta_mins)]


PARAM_SCHEDULERS.register_module(module=PolyLRGroupFloors)


def _base_lr(scheduler: Any) -> float:
    """The LR the floors are relative to: the optimizer's configured LR (the backbone's)."""
    lr = scheduler.optimizer.defaults.get('lr')
    if isinstance(lr, (int, float)) and lr > 0:
        return float(lr)
    return min(v for v in scheduler.base_values if v > 0) if any(scheduler.base_values) else 1.


def group_floors(schedulers: Any, base_lr: Optional[float]) -> List[str]:
    """Per-group floors for the scheduler configs with an absolute ``eta_min``, in place: PolyLR
    becomes :class:`PolyLRGroupFloors`, cosine schedules take ``eta_min_ratio``; another kind
    with an absolute floor is refused. Returns one line per change."""
    notes = []
    for i, sched in enumerate(schedulers if isinstance(schedulers, (list, tuple)) else
                              [schedulers] if schedulers else []):
        eta_min = sched.get('eta_min')
        kind = sched.get('type', '')  # a name, or the class itself in a pure-Python config
        kind = getattr(kind, '__name__', None) or str(kind).split('.')[-1]
        if not eta_min or sched.get('param_name', 'lr') != 'lr' or kind == 'PolyLRGroupFloors':
            continue
        if kind in ('PolyLR', 'CosineAnnealingLR', 'CosineRestartLR') and base_lr:
            if kind == 'PolyLR':
                sched['type'] = 'PolyLRGroupFloors'
            else:
                sched['eta_min'], sched['eta_min_ratio'] = None, eta_min / base_lr
            notes.append(f'param_scheduler[{i}] ({kind}): eta_min={eta_min:g} is a floor per '
                         'parameter group, so the head/backbone LR ratio holds to the end')
            continue
        raise ValueError(
            f'param_scheduler[{i}] ({kind}, eta_min={eta_min:g}) decays every param group to the '
            f'same absolute lr {eta_min:g}, which erases the head/backbone LR ratio by the end '
            'of training, and daft-mm cannot give it one floor per group. Fix: eta_min=0, or '
            'PolyLR / CosineAnnealingLR (their floors are kept per group)')
    return notes


def _is_daft_constructor(name: Any) -> bool:
    """A registered constructor derived from :class:`DAFTOptimWrapperConstructor`."""
    try:
        found = OPTIM_WRAPPER_CONSTRUCTORS.get(name) if isinstance(name, str) else name
    except KeyError:
        return False
    return isinstance(found, type) and issubclass(found, DAFTOptimWrapperConstructor)


def complete_daft_config(cfg: Any) -> List[str]:
    """Complete a loaded DAFT config in place (a non-DAFT config is left alone): the optimizer
    constructor with the final ``daft_*`` keys (``optim_wrapper.paramwise_cfg.daft``, rewritten
    each time, so call it again after changing them) and per-group LR floors. Returns what
    changed, one line each. Idempotent."""
    if hook_config(cfg) is None and is_daft_config(cfg) is None:
        return []
    optim = cfg.get('optim_wrapper')
    if not isinstance(optim, Mapping) or 'optimizer' not in optim:
        return []  # several optimizers (OptimWrapperDict): DAFTHook checks what it can
    constructor = optim.get('constructor')
    if constructor not in (None, 'DefaultOptimWrapperConstructor', CONSTRUCTOR) \
            and not _is_daft_constructor(constructor):
        raise ValueError(
            f'optim_wrapper.constructor={constructor!r}: DAFT builds its parameter groups with '
            f'{CONSTRUCTOR} (the head at {LR_MULT_KEY} x the base LR), and two constructors '
            f'cannot both build the optimizer. Fix: drop the constructor, or derive yours from '
            f'daft_mm.mm.optim.{CONSTRUCTOR}')
    notes = []
    if constructor in (None, 'DefaultOptimWrapperConstructor'):
        optim['constructor'] = CONSTRUCTOR
        notes.append(f'optim_wrapper.constructor={CONSTRUCTOR!r}')
    paramwise = optim.get('paramwise_cfg') or {}
    paramwise['daft'] = daft_settings(cfg)
    optim['paramwise_cfg'] = paramwise
    base_lr = (optim.get('optimizer') or {}).get('lr')
    notes += group_floors(cfg.get('param_scheduler'), base_lr)
    return notes


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class DAFTOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor with DAFT's head groups: the plan is decided here, when the
    Runner builds the optimizer, and the head modules and predictors get ``lr_mult`` =
    ``daft_head_lr_mult`` in ``paramwise_cfg.custom_keys`` (yours kept; a conflicting entry for a
    predictor is an error naming both). The wrapper it returns carries the plan
    (``daft_plan``) and the settings it was made from (``daft_settings``).

    ``paramwise_cfg.daft`` holds the settings (:func:`daft_settings`), written by
    :func:`complete_daft_config`; set the top-level ``daft_*`` keys, not these.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        paramwise = dict(paramwise_cfg or {})
        self.settings = dict(paramwise.pop('daft', None) or {})
        super().__init__(optim_wrapper_cfg, paramwise or None)

    def __call__(self, model: nn.Module) -> Any:
        s = self.settings
        hook = dict(s.get('hook') or {})
        keys = {key: s.get(short) for short, key in _KEYS.items()}
        plan = decide_plan(keys, model, predictors=hook.get('predictors'),
                           convert=hook.get('convert', True),
                           zero_init=hook.get('zero_init', True), modules=hook.get('modules'),
                           load_from=s.get('load_from'))
        if plan.head_lr:
            names = list(dict.fromkeys(plan.head_modules + plan.predictors))
            new = head_lr_cfg({'paramwise_cfg': self.paramwise_cfg}, names, plan.head_lr_mult,
                              plan.head_lr_mult_from)
            if new is not None:
                self.paramwise_cfg = new['paramwise_cfg']
        wrapper = super().__call__(model)
        wrapper.daft_plan = plan
        wrapper.daft_settings = s
        return wrapper


def _nested_custom_key(custom: Mapping[str, Any]) -> Optional[str]:
    """A custom_keys entry made by a dotted ``--cfg-options`` key: ``custom_keys.a.b.lr_mult=20``
    becomes ``{'a': {'b': {'lr_mult': 20}}}``, which mmengine reads as key ``'a'`` with no
    multiplier at all."""
    for key, value in custom.items():
        path = [key]
        while isinstance(value, Mapping) and value and not {'lr_mult', 'decay_mult'} & set(value):
            sub = next(iter(value))
            path.append(sub)
            value = value[sub]
        if len(path) > 1:
            return '.'.join(path)
    return None


def head_lr_cfg(optim_cfg: Mapping[str, Any], predictors: Sequence[str], mult: float,
                     mult_source: str) -> Optional[dict]:
    """``optim_cfg`` with ``custom_keys[name].lr_mult = mult`` for every predictor that lacks one,
    or None when nothing is missing. A predictor entry with another ``lr_mult`` is a conflict
    between two places that set the same thing: an error naming both."""
    paramwise = optim_cfg.get('paramwise_cfg') or {}
    custom = paramwise.get('custom_keys') or {}
    nested = _nested_custom_key(custom)
    if nested is not None:
        head = nested.split('.', 1)[0]
        raise ValueError(
            f"{_CUSTOM} has a nested entry {nested!r}: --cfg-options splits keys at dots, so "
            f"custom_keys.{nested}.lr_mult=... makes a key {head!r} without a multiplier instead "
            f"of addressing the module {nested!r}, and no learning rate changes. Fix: for the "
            f'DAFT predictors set {LR_MULT_KEY}=<value>; for other modules quote the whole dict: '
            f"--cfg-options \"{_CUSTOM}={{'{nested}':{{'lr_mult':20}}}}\"")
    def set_mult(name: str) -> Optional[float]:
        entry = custom.get(name)
        if isinstance(entry, Mapping) and entry.get('lr_mult') is not None:
            return float(entry['lr_mult'])
        return None

    conflicts = [f"{_CUSTOM}['{name}'].lr_mult={custom[name]['lr_mult']!r}"
                 for name in predictors if set_mult(name) not in (None, mult)]
    if conflicts:
        raise ValueError(
            f'the DAFT predictors\' LR multiplier is set twice with different values: {mult:g} '
            f'from {mult_source} and {", ".join(conflicts)}. Fix: set it in one place, '
            f'{LR_MULT_KEY} (DAFTOptimWrapperConstructor builds the head\'s groups from it): drop '
            'those custom_keys entries')
    missing = [name for name in predictors if set_mult(name) is None]
    if not missing:
        return None
    new = copy.deepcopy(dict(optim_cfg))
    new_paramwise = dict(new.get('paramwise_cfg') or {})
    new_custom = dict(new_paramwise.get('custom_keys') or {})
    for name in missing:
        new_custom[name] = dict(new_custom.get(name) or {}, lr_mult=mult)
    new_paramwise['custom_keys'] = new_custom
    new['paramwise_cfg'] = new_paramwise
    return new


def describe_lrs(groups: Dict[str, List[float]]) -> str:
    """``name lr`` pairs (a range when a name's parameters train at several LRs)."""
    parts = []
    for name, lrs in groups.items():
        lo, hi = min(lrs), max(lrs)
        parts.append(f'{name} {lo:g}' if lo == hi else f'{name} {lo:g}..{hi:g}')
    return ', '.join(parts)



def check_lr_floors(schedulers: Sequence[Any]) -> None:
    """Refuse a built LR scheduler that pulls groups with different LRs to one absolute floor
    (a config not completed by :func:`complete_daft_config`)."""
    if isinstance(schedulers, dict):
        schedulers = [s for group in schedulers.values() for s in group]
    for i, sched in enumerate(schedulers or []):
        if isinstance(sched, PolyLRGroupFloors) or getattr(sched, 'param_name', None) != 'lr':
            continue
        if getattr(sched, 'eta_min', None) and len(set(sched.base_values)) > 1 and \
                isinstance(sched, (PolyLR, CosineAnnealingLR, CosineRestartLR)):
            raise ValueError(
                f'param_scheduler[{i}] ({type(sched).__name__}, eta_min={sched.eta_min:g}) pulls '
                'the head and the backbone to one absolute LR, erasing the ratio by the end. Fix: '
                'load the config with daft_mm.mm.cli.load_config (tools/train.py does), which makes '
                'eta_min a floor per group, or call daft_mm.mm.optim.complete_daft_config(cfg) '
                'before Runner.from_cfg(cfg)')


def effective_lrs(optimizer: Any, net: nn.Module, plan: DAFTPlan) -> Dict[str, List[float]]:
    """Start LRs by owner: each predictor, each head module and each other top-level module of
    ``net`` (most specific name wins), heads first."""
    owner: Dict[int, str] = {}
    for top, module in net.named_children():
        for p in module.parameters():
            owner[id(p)] = top
    heads = set()
    for group in (list(plan.head_modules), list(plan.predictors)):
        for name, module in (resolve_modules(net, group).items() if group else ()):
            heads.add(name)
            for p in module.parameters():
                owner[id(p)] = name
    found: Dict[str, List[float]] = {}
    for group in optimizer.param_groups:
        lr = group.get('initial_lr', group['lr'])
        for p in group['params']:
            found.setdefault(owner.get(id(p), 'other'), []).append(lr)
    return dict(sorted(found.items(), key=lambda kv: (kv[0] not in heads, kv[0])))


def check_head_lr(lrs: Mapping[str, List[float]], plan: DAFTPlan) -> None:
    """The head must train above the rest (DAFT's integrated LP+FT)."""
    heads = set(plan.head_modules) | set(plan.predictors)
    head = [lr for name, values in lrs.items() if name in heads for lr in values]
    rest = [lr for name, values in lrs.items() if name not in heads for lr in values]
    if head and rest and min(head) <= max(rest):
        raise ValueError(
            f'the head {sorted(heads)} trains with lr {min(head):g}, not above the rest of the '
            f"model ({max(rest):g}); DAFT trains it with an LR far above the backbone's. "
            f'Effective LRs: {describe_lrs(lrs)}. Fix: {LR_MULT_KEY}=10, or '
            'DAFTHook(check_lr=False) to train them at one LR')
