"""The DAFT plan of an mm run: what is converted, what is head, at which LR ratio, decided once
from the config, the model and (for ``load_from``) the checkpoint's keys and shapes.

Who decides it: the optimizer-wrapper constructor (:mod:`daft_mm.mm.optim`), when the Runner builds
the optimizer, because the head's parameter groups follow from it; the built wrapper carries it
(``optim_wrapper.daft_plan``) and ``DAFTHook`` reads it there. Nothing changes it afterwards.
What counts as pretrained is what loads (:mod:`daft_mm.mm.loaded`): the ``Pretrained`` init_cfgs
and ``load_from`` are read for their keys and shapes (a ``meta``-device load reads no tensor data),
not trusted for what they declare.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mmengine.model import BaseTTAModel, is_model_wrapper
from torch import nn

from daft_mm.core import Plan, get_recipe, resolve_modules, split_batchnorms
from daft_mm.core import head_modules as core_head_modules
from daft_mm.core.recipes import DAFT_HEAD_SCOPE, HEAD_SCOPES

from .loaded import checkpoint_pretrained, init_cfg_loaded
from .predictors import check_predictors, predictor_names
from .preparation import require_bn_train
from .settings import (CONVERT_MODULES_KEY, HEAD_MODULES_KEY, PREDICTORS_KEY, check_daft_keys,
                       head_lr_mult)

__all__ = ['unwrap', 'split_model', 'resolve_predictors', 'head_modules', 'ConversionPlan',
           'conversion_override', 'conversion_plan', 'load_from_modules', 'DAFTPlan',
           'decide_plan']


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP/FSDP wrappers and test-time-augmentation models (``SegTTAModel``,
    ``DetTTAModel``), which all hold it as ``.module``."""
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def split_model(model: nn.Module) -> Tuple[nn.Module, nn.Module, str]:
    """(outer model, the segmentor / detector, config key prefix of the latter) of a Runner's
    model: wrappers (DDP, TTA) removed, then a ``DAFTModel`` opened. The one unwrap of the mm
    layer."""
    outer = unwrap(model)
    inner = getattr(outer, 'model', None)
    if isinstance(inner, nn.Module) and hasattr(outer, 'stage'):  # a DAFTModel
        return outer, inner, 'model.model.'
    return outer, outer, 'model.'


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


def load_from_modules(net: nn.Module, load_from: str) -> Dict[str, str]:
    """The modules a ``load_from`` checkpoint fills with the same shapes (:func:`checkpoint_
    pretrained`), read for its keys and shapes only: a ``meta``-device load reads no tensor data,
    so the Runner's own load stays the one that reads the weights."""
    from .safe_load import safe_torch_load
    try:
        saved = safe_torch_load(load_from, map_location='meta', source=str(load_from))
    except FileNotFoundError:
        raise FileNotFoundError(f'load_from={load_from!r} does not exist. Fix: the path of a '
                                'checkpoint, or load_from=None') from None
    state = saved.get('state_dict', saved) if isinstance(saved, Mapping) else {}
    return checkpoint_pretrained(net, state, str(load_from))


# --------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class DAFTPlan:
    """Everything DAFT decides about a run, decided once when the Runner builds the optimizer
    (:class:`daft_mm.mm.optim.DAFTOptimWrapperConstructor`) from the config, the model, the
    hook's arguments and the keys of a ``load_from`` checkpoint; logged, saved with every
    checkpoint, and read everywhere after, never changed.

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

    def core(self, priors: Optional[Mapping[str, Any]] = None) -> Plan:
        """The torch-only plan :func:`daft_mm.core.prepare` carries out (``priors``: the prior
        bias of each sigmoid/focal predictor, from its head's own init)."""
        conv = self.conversion
        return Plan(convert=conv.converted if self.convert and conv else (),
                    left_new=conv.left_new if self.convert and conv else (),
                    predictors=self.predictors if self.zero_init else (),
                    priors=tuple((priors or {}).items()), zero_init=self.zero_init,
                    head_modules=self.head_modules if self.head_lr else (),
                    head_lr_mult=self.head_lr_mult if self.head_lr else 1.0)

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


def decide_plan(cfg: Mapping[str, Any], model: nn.Module, *, predictors: Any = None,
                convert: bool = True, zero_init: bool = True,
                modules: Optional[Sequence[str]] = None,
                load_from: Optional[str] = None) -> DAFTPlan:
    """The :class:`DAFTPlan` of a run. ``cfg`` holds the top-level ``daft_*`` keys; ``model`` is
    the Runner's model (wrapped or not, a ``DAFTModel`` or the segmentor / detector itself);
    ``predictors``, ``convert``, ``zero_init`` and ``modules`` are ``DAFTHook``'s arguments;
    ``load_from``: a checkpoint the run starts from (every module it fills counts as pretrained).
    Every mistake is an error naming the key to fix, raised before anything was built on it."""
    model, net, key = split_model(model)
    check_daft_keys(cfg)
    wrapped = model is not net
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
    conversion = override = None
    pretrained: Dict[str, str] = {}
    if convert:
        feature_extractor = (model.feature_extractor if wrapped
                             and model.feature_extractor_configured else None)
        override = conversion_override(cfg, net, modules, feature_extractor)
        pretrained, notes = init_cfg_loaded(net)  # what the init_cfgs fill, not what they say
        if load_from:
            pretrained.update(load_from_modules(net, load_from))
        if not wrapped:  # a DAFTModel checked it when it was built
            require_bn_train(net, key, 'DAFT (on the converted statistics)')
        conversion = conversion_plan(net, override, pretrained, stage.convert_scope, notes)
    return DAFTPlan(
        method=stage.name, convert=convert, zero_init=zero_init, head_lr=head_lr,
        predictors=tuple(names),
        predictors_from=names_from, head_modules=tuple(heads), head_scope=scope,
        head_lr_mult=mult, head_lr_mult_from=mult_from, conversion=conversion,
        convert_override=override, pretrained=tuple(pretrained.items()),
        convert_scope=stage.convert_scope)
