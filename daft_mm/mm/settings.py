"""DAFT's settings, read at start-up from wherever the user set them.

Why at start-up: a classic config resolves ``{{_base_.x}}`` and comprehensions when it is parsed,
so a learning-rate multiplier computed inside ``configs/_base_/daft.py`` would keep its old value
when a child config or ``--cfg-options`` changes ``daft_head_lr_mult`` or ``daft_predictors``.
DAFTHook reads the final config (``runner.cfg``) in ``before_run`` and derives the
``paramwise_cfg`` entries from it, so the value the user changed is the value that trains.

The user-facing keys (top level of a config):

* ``daft_predictors``   module paths of the final predictors (zero init, high LR)
* ``daft_head_lr_mult`` the head's LR over the base LR
* ``daft_head_modules`` what "the head" is for that LR: ``'predictors'`` (the final predictors),
  ``'new_modules'`` (every top-level module outside the backbone: decode / auxiliary heads, necks,
  detection heads; the DAFT recipe's default) or a list of module paths. Zero-init stays on the
  predictors.

* ``daft_convert_modules`` which BN layers BN conversion rewrites: unset (default) the ones whose
  weights came from pretrained weights (see :func:`conversion_plan`), ``'all'``, or a list of
  module paths.

Older configs that copy ``daft_paramwise_cfg`` into ``optim_wrapper.paramwise_cfg`` keep working
as long as the values agree; when they disagree the error names both keys.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mmengine.model import BaseTTAModel, is_model_wrapper
from torch import nn

from daft_mm.core import FineTuneStage, get_recipe, resolve_modules, split_batchnorms
from daft_mm.core import head_modules as core_head_modules
from daft_mm.core.recipes import DAFT_HEAD_LR_MULT, DAFT_HEAD_SCOPE, HEAD_SCOPES

from .loaded import (checkpoint_pretrained, checkpoint_shapes, init_cfg_loaded,  # noqa: F401
                     init_cfg_pretrained)
from .predictors import check_predictors, predictor_names

__all__ = ['PREDICTORS_KEY', 'LR_MULT_KEY', 'HEAD_MODULES_KEY', 'CONVERT_MODULES_KEY', 'unwrap',
           'head_lr_mult', 'head_modules', 'predictor_lr_cfg', 'ConversionPlan',
           'init_cfg_pretrained', 'init_cfg_loaded', 'checkpoint_shapes', 'checkpoint_pretrained',
           'conversion_override', 'conversion_plan', 'DAFTPlan', 'decide_plan', 'resolve_stage',
           'is_daft_config', 'require_daft_hook', 'KNOWN_KEYS', 'check_daft_keys']

PREDICTORS_KEY = 'daft_predictors'
LR_MULT_KEY = 'daft_head_lr_mult'
HEAD_MODULES_KEY = 'daft_head_modules'
CONVERT_MODULES_KEY = 'daft_convert_modules'
#: every top-level ``daft_*`` key the project reads or ships; any other is a typo
KNOWN_KEYS = (PREDICTORS_KEY, LR_MULT_KEY, HEAD_MODULES_KEY, CONVERT_MODULES_KEY,
              'daft_paramwise_cfg', 'daft_backbone')
_CUSTOM = 'optim_wrapper.paramwise_cfg.custom_keys'


def check_daft_keys(cfg: Mapping[str, Any]) -> None:
    """Refuse an unknown top-level ``daft_*`` key, naming the closest known one: a misspelt
    ``daft_head_lr_mul=20`` would otherwise train at the default 10x without a word."""
    import difflib
    unknown = [key for key in cfg.keys() if isinstance(key, str)
               and key.lower().startswith('daft_') and key not in KNOWN_KEYS]
    if not unknown:
        return
    hints = []
    for key in sorted(unknown):
        exact = [k for k in KNOWN_KEYS if k == key.lower()]  # another case: Daft_head_lr_mult
        close = exact or difflib.get_close_matches(key.lower(), KNOWN_KEYS, n=1, cutoff=0.6)
        hints.append(f'{key} (did you mean {close[0]}?)' if close else key)
    raise ValueError(f'unknown DAFT config key(s): {", ".join(hints)}; daft-mm reads '
                     f'{", ".join(KNOWN_KEYS)}. Fix: correct the spelling '
                     '(keys are lower case; daft_mm/configs/_base_/daft.py documents each), or '
                     'rename a key of your own so it does not start with "daft_"')


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP/FSDP wrappers and test-time-augmentation models (``SegTTAModel``,
    ``DetTTAModel``), which all hold it as ``.module``."""
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def head_lr_mult(cfg: Mapping[str, Any]) -> Tuple[float, str]:
    """(multiplier, where it came from): ``daft_head_lr_mult`` if set, else DAFT's default."""
    if cfg.get(LR_MULT_KEY) is None:
        return DAFT_HEAD_LR_MULT, f'the DAFT default ({LR_MULT_KEY} not set)'
    value = cfg[LR_MULT_KEY]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'{LR_MULT_KEY} must be a positive number (the predictors\' LR over the '
                         f'base LR), got {value!r}. Fix: e.g. --cfg-options {LR_MULT_KEY}=10')
    return float(value), LR_MULT_KEY


def head_modules(cfg: Mapping[str, Any], net: nn.Module, predictors: Sequence[str],
                 pretrained: Sequence[str] = ('backbone', ),
                 default: str = DAFT_HEAD_SCOPE) -> Tuple[List[str], str]:
    """(module paths trained at the head LR, how they were chosen) from ``daft_head_modules``,
    or ``default`` (the recipe's head scope) when it is not set.

    ``'predictors'``: the final predictors. ``'new_modules'``: every top-level module
    with parameters outside ``pretrained`` (a fresh decode head is random as a whole, not only in
    its last layer). A list: those module paths, which must cover the predictors (a zero predictor
    at the backbone's LR would make the integrated LP phase crawl)."""
    value = cfg.get(HEAD_MODULES_KEY)
    if value is None:
        value = default
    fix = (f"Fix: {HEAD_MODULES_KEY}='predictors', 'new_modules' or a list of module paths "
           "such as ['decode_head', 'auxiliary_head']")
    if value in HEAD_SCOPES:
        try:
            return core_head_modules(net, list(predictors), value, list(pretrained)), value
        except (KeyError, ValueError) as exc:
            raise ValueError(f'{HEAD_MODULES_KEY}={value!r}: {exc.args[0]}. {fix}') from None
    if isinstance(value, str):  # a single path would read like a scope with a typo
        raise ValueError(f'{HEAD_MODULES_KEY}={value!r} is not one of {HEAD_SCOPES}. {fix}')
    names = list(value)
    try:
        resolved = resolve_modules(net, names)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f'{HEAD_MODULES_KEY}: {exc.args[0]}. {fix}') from None
    inside = {id(sub) for module in resolved.values() for sub in module.modules()}
    uncovered = [name for name, module in resolve_modules(net, list(predictors)).items()
                 if id(module) not in inside]
    if uncovered:
        raise ValueError(f'{HEAD_MODULES_KEY}={names} leaves the predictors {uncovered} at the '
                         f'backbone\'s LR. {fix}, covering them')
    return names, HEAD_MODULES_KEY


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


def predictor_lr_cfg(optim_cfg: Mapping[str, Any], predictors: Sequence[str], mult: float,
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
            f'{LR_MULT_KEY} (DAFTHook derives paramwise_cfg from it at start-up): drop '
            "`optim_wrapper = dict(paramwise_cfg={{_base_.daft_paramwise_cfg}})` from the config")
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


def _hook_type(hook: Any) -> str:
    if isinstance(hook, Mapping):
        kind = hook.get('type')
        return kind if isinstance(kind, str) else getattr(kind, '__name__', str(kind))
    return type(hook).__name__


def is_daft_config(cfg: Mapping[str, Any]) -> Optional[str]:
    """Why ``cfg`` is a DAFT config (it inherits the DAFT fragment, or wraps the model with a
    method that converts BN / zeroes predictors), or None."""
    for key in (PREDICTORS_KEY, LR_MULT_KEY):
        if cfg.get(key) is not None:
            return f'it sets {key} (configs/_base_/daft*.py)'
    model = cfg.get('model') or {}
    if isinstance(model, Mapping) and model.get('type') in ('DAFTModel', 'daft_mm.DAFTModel'):
        method = model.get('method', 'daft')
        stage = resolve_stage(method)
        if stage.convert_bn or stage.zero_init_head:
            return f'model.method={method!r}'
    return None


def resolve_stage(method: str) -> FineTuneStage:
    """The single-stage core recipe for ``method`` ('daft', 'ft', 'lp').

    A run of an mm config is one stage: LP-FT is two runs (the second starts from the first's
    checkpoint through ``load_from``) because mmengine builds the optimizer once, before training,
    and leaves out parameters that do not require grad at that moment.
    """
    recipe = get_recipe(method)
    if len(recipe.stages) != 1:
        names = [stage.name for stage in recipe.stages]
        raise ValueError(
            f'method={method!r} has {len(recipe.stages)} stages {names}; an mm config runs one '
            'stage. Run LP-FT as two configs: method=\'lp\', then method=\'ft\' with '
            "load_from='<work_dir of the LP run>/iter_<N>.pth' (see configs/baselines/lpft_*.py)")
    return recipe.stages[0]


def require_daft_hook(cfg: Mapping[str, Any], hooks: Optional[Sequence[Any]] = None) -> None:
    """Refuse a DAFT config whose ``custom_hooks`` lost DAFTHook: a child's ``custom_hooks``
    replaces the base's list, and training would then run with no BN conversion, no zero init
    and no warning. ``hooks``: built hooks (``runner.hooks``), default the config's list."""
    why = is_daft_config(cfg)
    if why is None:
        return
    configured = [_hook_type(h) for h in cfg.get('custom_hooks') or []]
    present = configured if hooks is None else [_hook_type(h) for h in hooks]
    if 'DAFTHook' in present:
        return
    others = [t for t in configured if t]
    extra = ''.join(f", dict(type='{t}')" for t in others) or ", dict(type='DistortionHook')"
    raise ValueError(
        f'this is a DAFT config ({why}) but custom_hooks has no DAFTHook '
        f'(custom_hooks = {others}): a config\'s custom_hooks replaces the list of its base, so '
        'training would run without BN conversion or zero predictors. Fix: list DAFTHook next to '
        f"your hooks, custom_hooks = [dict(type='DAFTHook'){extra}] (classic style), or "
        "custom_hooks.append(...) after read_base() (pure-Python style)")


def resolve_predictors(candidates: List[Tuple[str, Optional[Sequence[str]]]]
                       ) -> Tuple[Optional[List[str]], Optional[str]]:
    """The first configured predictor list among (config key, names) pairs, checked against the
    others: two places naming different predictors are an error naming both keys."""
    chosen: Optional[Tuple[str, List[str]]] = None
    for key, names in candidates:
        if names is None:
            continue
        names = [names] if isinstance(names, str) else list(names)
        if chosen is None:
            chosen = (key, names)
        elif sorted(chosen[1]) != sorted(names):
            raise ValueError(
                f'the DAFT predictors are set twice with different values: {chosen[0]}='
                f'{chosen[1]} and {key}={names}. Fix: set them in one place: '
                f'{PREDICTORS_KEY}=[...] (a top-level key, read by DAFTHook and DAFTModel at '
                'start-up), and remove the predictors argument of the DAFTHook / DAFTModel config')
    return (chosen[1], chosen[0]) if chosen else (None, None)


def describe_lrs(groups: Dict[str, List[float]]) -> str:
    """``name lr`` pairs (a range when a name's parameters train at several LRs)."""
    parts = []
    for name, lrs in groups.items():
        lo, hi = min(lrs), max(lrs)
        parts.append(f'{name} {lo:g}' if lo == hi else f'{name} {lo:g}..{hi:g}')
    return ', '.join(parts)


# ------------------------------------------------------------------- what BN conversion rewrites
@dataclass(frozen=True)
class ConversionPlan:
    """Which BN layers DAFT converts and why: decided once, before the statistics pass, from how
    the weights were loaded (or an explicit override), logged and saved with the run.

    Attributes:
        converted: BN layers whose statistics and affine parameters conversion rewrites.
        left_new: BN layers left exactly as initialised (new to the pretrained model).
        pretrained: ``(module path, where its weights came from)`` for every module counted as
            pretrained (or chosen by the override).
        decided_by: ``'pretrained weights'`` or the key of the override that decided it.
        notes: modules whose ``Pretrained`` init_cfg filled them only partly or not at all
            (:func:`daft_mm.mm.loaded.init_cfg_loaded`).
    """

    converted: Tuple[str, ...]
    left_new: Tuple[str, ...]
    pretrained: Tuple[Tuple[str, str], ...]
    decided_by: str
    notes: Tuple[str, ...] = ()

    def summary(self) -> str:
        where = '; '.join(f'{path} ({why})' for path, why in self.pretrained[:8]) or 'none'
        if len(self.pretrained) > 8:
            where += f'; ... {len(self.pretrained) - 8} more'
        lines = [f'BN layers converted: {len(self.converted)}, left as initialised (new): '
                 f'{len(self.left_new)}; decided by {self.decided_by}; pretrained: {where}']
        if self.left_new:
            shown = ', '.join(self.left_new[:6]) + (' ...' if len(self.left_new) > 6 else '')
            lines.append(f'left as initialised: {shown}')
        lines += [f'NOTE {note}' for note in self.notes]
        return '\n'.join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {'converted': list(self.converted), 'left_new': list(self.left_new),
                'pretrained': dict(self.pretrained), 'decided_by': self.decided_by,
                'notes': list(self.notes)}


#: an explicit choice of what conversion rewrites: (module paths, or None for all; the key)
Override = Tuple[Optional[Tuple[str, ...]], str]


def conversion_override(cfg: Mapping[str, Any], net: nn.Module,
                        hook_modules: Optional[Sequence[str]],
                        feature_extractor: Optional[Sequence[str]]) -> Optional[Override]:
    """An explicit choice of the converted modules, checked: ``(module paths or None for all,
    the key that set it)``, or None when the pretrained weights decide. The hook's ``modules``
    wins over ``daft_convert_modules`` (both set differently is an error naming both), which wins
    over an explicitly configured ``DAFTModel.feature_extractor``."""
    value = cfg.get(CONVERT_MODULES_KEY)
    fix = (f"Fix: {CONVERT_MODULES_KEY}='all' or a list of module paths such as ['backbone'], or "
           'leave it unset (the pretrained weights decide)')
    if isinstance(value, str) and value != 'all':
        raise ValueError(f"{CONVERT_MODULES_KEY}={value!r} is neither 'all' nor a list of module "
                         f'paths. {fix}')
    hook_key = 'custom_hooks[DAFTHook].modules'
    if hook_modules is not None and value is not None and (
            value == 'all' or sorted(value) != sorted(hook_modules)):
        raise ValueError(f'the BN layers to convert are set twice with different values: '
                         f'{hook_key}={list(hook_modules)} and {CONVERT_MODULES_KEY}={value!r}. '
                         f'Fix: set them in one place ({CONVERT_MODULES_KEY})')
    chosen: Optional[Override] = None
    if hook_modules is not None:
        chosen = tuple(hook_modules), hook_key
    elif value == 'all':
        return None, CONVERT_MODULES_KEY
    elif value is not None:
        chosen = tuple(value), CONVERT_MODULES_KEY
    elif feature_extractor is not None:
        chosen = tuple(feature_extractor), 'model.feature_extractor'
    if chosen is None:
        return None
    try:
        split_batchnorms(net, chosen[0])
    except ValueError as exc:
        raise ValueError(f'{chosen[1]}: {exc.args[0]}. {fix}') from None
    return chosen


def conversion_plan(net: nn.Module, override: Optional[Override], pretrained: Mapping[str, str],
                    scope: str = 'pretrained', notes: Sequence[str] = ()) -> ConversionPlan:
    """DAFT's rule (:func:`daft_mm.core.split_batchnorms`) applied to what was loaded: the BN
    layers of the ``pretrained`` modules are converted, the rest stay as initialised; an
    ``override`` (:func:`conversion_override`) or ``scope='all'`` replaces the pretrained set."""
    if override is not None:
        modules, key = override
        if modules is None:
            converted, _ = split_batchnorms(net, None, 'all')
            return ConversionPlan(tuple(converted), (), (('*', f'{key}=all'), ), key)
        converted, fresh = split_batchnorms(net, modules)
        return ConversionPlan(tuple(converted), tuple(fresh),
                              tuple((m, key) for m in modules), key)
    converted, fresh = split_batchnorms(net, list(pretrained), scope)
    return ConversionPlan(tuple(converted), tuple(fresh), tuple(pretrained.items()),
                          'pretrained weights' if scope == 'pretrained' else f'recipe {scope}',
                          tuple(notes))


# --------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class DAFTPlan:
    """Everything DAFT decides about a run, decided once when training starts (``DAFTHook``'s
    ``before_run``) from the config, the model and the hook's arguments; logged, saved with every
    checkpoint, and read everywhere after. The one thing known later is what a ``load_from``
    checkpoint holds: :meth:`with_checkpoint` adds it to the conversion when it loads.

    Attributes:
        method: the fine-tuning stage (``'daft'`` or an ablation, ``DAFTModel.method``).
        convert, zero_init: the two parts of DAFT this run does.
        head_lr: the head trains at ``head_lr_mult`` x the base LR (the method's choice, kept
            when ``zero_init=False`` continues from a trained DAFT checkpoint).
        predictors: the final predictors (zeroed; always inside the head).
        predictors_from: the key that named them (or the head table).
        head_modules: the modules trained at ``head_lr_mult`` x the base LR.
        head_scope: ``'predictors'``, ``'new_modules'`` or the key of an explicit list.
        head_lr_mult, head_lr_mult_from: the head/backbone LR ratio and where it came from.
        conversion: which BN layers are converted and which stay as initialised (None without
            conversion).
    """

    method: str
    convert: bool
    zero_init: bool
    head_lr: bool
    predictors: Tuple[str, ...]
    predictors_from: str
    head_modules: Tuple[str, ...]
    head_scope: str
    head_lr_mult: float
    head_lr_mult_from: str
    conversion: Optional[ConversionPlan]
    #: what decides the conversion: an explicit override, else the pretrained modules
    convert_override: Optional[Override] = None
    pretrained: Tuple[Tuple[str, str], ...] = ()
    convert_scope: str = 'pretrained'

    def with_checkpoint(self, net: nn.Module, loaded: Mapping[str, str]) -> 'DAFTPlan':
        """The plan once ``load_from`` loaded: every module it holds counts as pretrained."""
        if not self.convert or not loaded:
            return self
        pretrained = dict(self.pretrained)
        pretrained.update(loaded)
        notes = self.conversion.notes if self.conversion is not None else ()
        return replace(self, pretrained=tuple(pretrained.items()),
                       conversion=conversion_plan(net, self.convert_override, pretrained,
                                                  self.convert_scope, notes))

    def summary(self) -> str:
        """The start-up block: what is converted, what is head, at which LR ratio."""
        parts = ['convert BN' if self.convert else None, 'zero predictors'
                 if self.zero_init else None]
        lines = [f'DAFT plan ({self.method}: {" + ".join(p for p in parts if p)})']
        if self.zero_init:
            lines.append(f'  predictors ({self.predictors_from}): {", ".join(self.predictors)}')
        if self.head_lr:
            lines.append(f'  head ({self.head_scope}) at {self.head_lr_mult:g}x the base LR '
                         f'({self.head_lr_mult_from}): {", ".join(self.head_modules)}')
        if self.conversion is not None:
            lines += ['  ' + line for line in self.conversion.summary().split('\n')]
        return '\n'.join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {'method': self.method, 'convert': self.convert, 'zero_init': self.zero_init,
                'head_lr': self.head_lr,
                'predictors': list(self.predictors), 'predictors_from': self.predictors_from,
                'head_modules': list(self.head_modules), 'head_scope': self.head_scope,
                'head_lr_mult': self.head_lr_mult, 'head_lr_mult_from': self.head_lr_mult_from,
                'conversion': None if self.conversion is None else self.conversion.to_dict()}


def decide_plan(cfg: Mapping[str, Any], model: nn.Module, net: nn.Module, *,
                predictors: Any = None, convert: bool = True, zero_init: bool = True,
                modules: Optional[Sequence[str]] = None) -> DAFTPlan:
    """The :class:`DAFTPlan` of a run. ``model`` is the Runner's model (a ``DAFTModel`` or the
    segmentor / detector ``net`` itself); ``predictors``, ``convert``, ``zero_init`` and
    ``modules`` are ``DAFTHook``'s arguments. Every mistake is an error naming the key to fix,
    raised before anything changed."""
    check_daft_keys(cfg)
    wrapped = getattr(model, 'model', None) is net and hasattr(model, 'stage')
    stage = model.stage if wrapped else get_recipe('daft').stages[0]
    if wrapped:
        if not (stage.convert_bn or stage.zero_init_head):
            raise ValueError(
                f"DAFTHook is configured but model.method={model.method!r} does not use "
                "DAFT's preparation. Fix: set model.method='daft', or remove DAFTHook from "
                'custom_hooks')
        # the wrapper's method names the ablation: the hook does the parts it uses, no more
        convert, zero_init = convert and stage.convert_bn, zero_init and stage.zero_init_head
        if not (convert or zero_init):
            raise ValueError(
                f'DAFTHook(convert=False / zero_init=False) with model.method={model.method!r} '
                'leaves nothing to do. Fix: use the method alone (DAFTHook() follows it) or '
                'drop the hook')
    # the predictors: the hook's argument, daft_predictors, an explicit DAFTModel.predictors
    hook_key = 'custom_hooks[DAFTHook].predictors'
    candidates = [(hook_key, predictors), (PREDICTORS_KEY, cfg.get(PREDICTORS_KEY))]
    if wrapped and model.predictors_configured:
        candidates.append(('model.predictors', list(model.predictors)))
    # The head's LR follows the method, not the zero_init switch: zero_init=False (continuing
    # from a finished DAFT checkpoint) keeps the trained predictors, and the head keeps its LR.
    head_lr = stage.zero_init_head or stage.head_lr_mult != 1.0
    if head_lr:  # a typo is reported under its own key before the values are compared
        candidates = [(k, None if v is None else predictor_names(net, v, k))
                      for k, v in candidates]
    names, names_from = resolve_predictors(candidates)
    if names is None:
        names = list(model.predictors) if wrapped else predictor_names(net, None, hook_key)
        names_from = 'the head table (daft_mm/mm/predictors.py)'
    heads: List[str] = []
    scope, mult, mult_from = 'predictors', 1.0, f'method {stage.name} (one LR)'
    if head_lr:
        names = check_predictors(net, names, names_from)
        pretrained_part = list(model.feature_extractor) if wrapped else ['backbone']
        heads, scope = head_modules(cfg, net, names, pretrained_part, stage.head_scope)
        mult, mult_from = head_lr_mult(cfg)
    if wrapped:
        model.predictors = tuple(names)
    conversion = override = None
    pretrained: Dict[str, str] = {}
    if convert:
        feature_extractor = (model.feature_extractor if wrapped
                             and model.feature_extractor_configured else None)
        override = conversion_override(cfg, net, modules, feature_extractor)
        pretrained, notes = init_cfg_loaded(net)  # what the init_cfgs fill, not what they say
        conversion = conversion_plan(net, override, pretrained, stage.convert_scope, notes)
    return DAFTPlan(
        method=stage.name, convert=convert, zero_init=zero_init, head_lr=head_lr,
        predictors=tuple(names),
        predictors_from=names_from, head_modules=tuple(heads), head_scope=scope,
        head_lr_mult=mult, head_lr_mult_from=mult_from, conversion=conversion,
        convert_override=override, pretrained=tuple(pretrained.items()),
        convert_scope=stage.convert_scope)
