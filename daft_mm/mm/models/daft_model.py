"""``DAFTModel``: wraps any mmseg segmentor / mmdet detector for one fine-tuning stage.

Why a wrapper and not a patched config: the fine-tuning method decides things a stock model
cannot express in its config: which parameters are frozen (LP), which BatchNorm layers must stay
in eval mode after every ``model.train()`` (LP), which layers are the final predictors (DAFT's
zero init and LR multiplier), and whether DAFT's preparation ran before the first step. The
wrapper is invisible everywhere else: ``train_step``/``val_step``/``test_step``/``forward`` and
``data_preprocessor`` are the wrapped model's, and its state dict has the wrapped model's keys, so
a checkpoint trained through it loads into the stock config of the same model.

All DAFT operations come from :mod:`daft_mm.core`; this file only adapts them to mmengine models.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from torch import nn

from daft_mm.core import (ConversionReport, FineTuneStage, convert_bn, get_recipe, is_batchnorm,
                          kept_modes, resolve_modules, set_bn_eval, zero_init_predictors)
from daft_mm.core.heads import PREDICTOR_TYPES
from daft_mm.mm.compat import register_load_state_dict_pre_hook, register_state_dict_post_hook

from ..predictors import default_predictors, predictor_priors

__all__ = ['DAFTModel', 'default_predictors', 'mm_forward', 'resolve_stage', 'norm_eval_modules',
           'require_bn_train', 'frozen_batchnorms', 'check_predictors', 'predictor_names',
           'predictor_priors']

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


PredictorSpec = Union[None, Sequence[str], Mapping[str, Sequence[str]]]


def predictor_names(model: nn.Module, spec: PredictorSpec, key: str) -> List[str]:
    """Predictor paths from a config value: ``None`` (the head table), a list of module paths /
    globs, or ``{head class: [layers]}`` (the head table plus these entries); checked."""
    if spec is None or isinstance(spec, Mapping):
        try:
            names = default_predictors(model, extra=spec)
        except (ValueError, TypeError) as exc:
            raise ValueError(f'{key}: {exc}') from None
    else:
        names = [spec] if isinstance(spec, str) else list(spec)
    return check_predictors(model, names, key)


def check_predictors(model: nn.Module, names: Sequence[str], key: str) -> List[str]:
    """Resolve predictor names and check each is a predictor leaf, before any weight changes.

    Errors name the config ``key`` to fix.
    """
    try:
        resolved = resolve_modules(model, list(names))
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise ValueError(f'{key}: {msg}. Fix: list module paths of the final predictor layers as '
                         f'in model.named_modules(), e.g. {default_predictors_or_hint(model)}'
                         ) from None
    bad = [f'{path} ({type(m).__name__})' for path, m in resolved.items()
           if not isinstance(m, PREDICTOR_TYPES) or any(True for _ in m.children())]
    if bad:
        raise ValueError(f'{key}: {bad} are not final predictor layers (a leaf Linear/ConvNd/'
                         'ConvTransposeNd). '
                         f'Fix: name the last layer of each head, e.g. '
                         f'{default_predictors_or_hint(model)}')
    return list(resolved)


def default_predictors_or_hint(model: nn.Module) -> Union[List[str], str]:
    try:
        return default_predictors(model)
    except (ValueError, TypeError):
        return "['decode_head.conv_seg']"


def norm_eval_modules(model: nn.Module) -> List[str]:
    """Paths of modules whose ``norm_eval=True`` keeps their BatchNorm layers in eval mode."""
    return [name for name, m in model.named_modules()
            if getattr(m, 'norm_eval', False) is True
            and any(is_batchnorm(sub) for sub in m.modules())]


_STEM = ('stem', 'conv1', 'bn1', 'norm1')


def _in_frozen_stage(rel: str, frozen_stages: int) -> Optional[bool]:
    """For a ResNet-style backbone (``stem``/``conv1``+``bn1``, ``layer1``..): whether ``rel``
    lies in a stage ``frozen_stages`` freezes; None if the naming is not ResNet's."""
    first = rel.split('.', 1)[0]
    if first in _STEM:
        return True
    if first.startswith('layer') and first[5:].isdigit():
        return int(first[5:]) <= frozen_stages
    return None


def frozen_batchnorms(model: nn.Module) -> Dict[str, Tuple[List[str], bool]]:
    """BN layers that would not train in ``model.train()``: ``{path: (causes, stem_only)}``.

    Causes are the settings responsible, as ``<module path>.<key>``: ``norm_eval`` (BN in eval
    mode), ``frozen_stages`` (the stage is in eval mode and frozen), ``norm_cfg.requires_grad``
    (weight and bias frozen). ``stem_only`` marks a stem BN frozen by ``frozen_stages=0``: the
    one frozen layer a user may keep on purpose. Every module's train/eval flag is restored.
    """
    modules = dict(model.named_modules())
    with kept_modes(model):
        model.train()
        found: Dict[str, Tuple[List[str], bool]] = {}
        for path, bn in modules.items():
            # a teacher (semi-supervised EMA, distillation) is frozen by design
            if not is_batchnorm(bn) or path.split('.', 1)[0].startswith('teacher'):
                continue
            in_eval = not bn.training
            grad_off = any(not p.requires_grad for p in bn.parameters(recurse=False))
            if not (in_eval or grad_off):
                continue
            parts = path.split('.')
            ancestors = [('.'.join(parts[:i]), modules['.'.join(parts[:i])])
                         for i in range(len(parts))]
            causes: List[str] = []
            stem_only = False
            for apath, anc in ancestors:
                key = f'{apath}.' if apath else ''
                if in_eval and getattr(anc, 'norm_eval', False) is True:
                    causes.append(f'{key}norm_eval')
                stages = getattr(anc, 'frozen_stages', None)
                if isinstance(stages, int) and not isinstance(stages, bool) and stages >= 0:
                    inside = _in_frozen_stage(path[len(key):], stages)
                    if inside or (inside is None and in_eval and not causes):
                        causes.append(f'{key}frozen_stages')
                        stem_only = stages == 0 and bool(inside)
            if grad_off and not any(c.endswith('frozen_stages') for c in causes):
                # the outermost module that passes its norm_cfg down (the backbone), not a block
                owner = next((apath for apath, anc in ancestors
                              if apath and isinstance(getattr(anc, 'norm_cfg', None), dict)), None)
                causes.append(f'{owner}.norm_cfg.requires_grad' if owner
                              else f'{path}.requires_grad')
            if not causes:
                causes.append(f'{path} (in eval mode after model.train())')
            found[path] = (causes, stem_only and len(causes) == 1)
        return found


_FIXES = {'norm_eval': 'False', 'frozen_stages': '-1', 'requires_grad': 'True'}


def require_bn_train(model: nn.Module, key_prefix: str, who: str) -> List[str]:
    """Refuse BatchNorm layers that would not train where the method trains BN: ``norm_eval=True``,
    ``frozen_stages >= 0`` (the stage stays in eval mode and frozen) and ``requires_grad=False``
    norms. The error names each config key (``key_prefix`` + module path) and its fix.

    ``frozen_stages=0`` (stem only) is what a user sets to keep the stem frozen on purpose: it is
    allowed, logged, and returned (the stem BN layers that stay frozen).
    """
    frozen = frozen_batchnorms(model)
    kept = [path for path, (_, stem_only) in frozen.items() if stem_only]
    refused = {path: causes for path, (causes, stem_only) in frozen.items() if not stem_only}
    if refused:
        keys: Dict[str, List[str]] = {}
        for path, causes in refused.items():
            for cause in causes:
                keys.setdefault(cause, []).append(path)
        listed = '; '.join(f'{key_prefix}{cause}' + ('=True' if cause.endswith('norm_eval') else '')
                           + f' ({len(paths)} BN layers, e.g. {paths[0]})'
                           for cause, paths in keys.items())
        fixes = ' '.join(f'{key_prefix}{cause}={_FIXES[cause.rsplit(".", 1)[-1]]}'
                         for cause in keys if cause.rsplit('.', 1)[-1] in _FIXES)
        raise ValueError(
            f'{listed} keep BatchNorm from training, but {who} fine-tunes with BatchNorm in train '
            f'mode. Fix: --cfg-options {fixes or "(make those layers trainable)"} '
            '(configs/_base_/daft_detection.py sets all three for a backbone: '
            'model = dict(backbone={{_base_.daft_backbone}}); frozen_stages=0 keeps only the '
            'stem frozen)')
    zero_eps = [path for path, m in model.named_modules()
                if path not in kept and getattr(m, 'running_mean', None) is not None
                and isinstance(getattr(m, 'eps', None), (int, float)) and not m.eps > 0]
    if zero_eps:
        raise ValueError(
            f'{len(zero_eps)} BatchNorm layers have eps=0 (e.g. {key_prefix}{zero_eps[0]}; stock '
            'NAS-FCOS sets it in the backbone\'s norm_cfg): frozen BN can use it, but BatchNorm '
            f'in train mode cannot (torch needs eps > 0), and {who} trains BN. Fix: --cfg-options '
            f'{key_prefix}backbone.norm_cfg.eps=1e-5 (configs/_base_/daft_detection.py\'s '
            'daft_backbone sets it)')
    if kept:
        from mmengine.logging import print_log
        print_log(f'{who}: frozen_stages=0 keeps the stem frozen; these BatchNorm layers stay in '
                  f'eval mode with their statistics and affine parameters fixed: {kept}',
                  logger='current')
    return kept


def mm_forward(mode: str = 'loss') -> Callable[[nn.Module, Any], Any]:
    """``forward(model, data_batch)`` for :func:`daft_mm.core.convert_bn` on an mmengine model.

    The batch goes through the model's own ``data_preprocessor`` exactly as in a training step
    (``training=True``: same normalisation, padding and batch augments), then through the model in
    ``mode``. ``'loss'`` (default) runs every module a training step runs, auxiliary heads included;
    ``'tensor'`` only the inference path (mmseg's ``'tensor'`` mode skips auxiliary heads).

    In ``'loss'`` mode every module except the BatchNorm layers runs in train mode (the BN layers
    keep whatever mode the caller set: eval in the conversion pass, so the function is the
    pretrained one): heads that branch on ``self.training`` must give what their loss expects
    (K-Net's decode head returns only its last stage in eval mode, and its loss then fails), and
    the BN layers see their inputs exactly as in a training step. Every flag is restored after.
    """
    if mode not in ('loss', 'tensor', 'predict'):
        raise ValueError(f"forward mode must be 'loss', 'tensor' or 'predict', got {mode!r}")

    def forward(model: nn.Module, data_batch: Any) -> Any:
        data = model.data_preprocessor(data_batch, True)
        with kept_modes(model):
            if mode == 'loss':
                for m in model.modules():
                    if not is_batchnorm(m):
                        m.training = True
            if isinstance(data, dict):
                return model(**data, mode=mode)
            return model(*data, mode=mode)

    return forward


@MODELS.register_module()
class DAFTModel(BaseModel):
    """One fine-tuning stage (``method`` = 'daft', 'ft' or 'lp') of a wrapped mmseg/mmdet model.

    Args:
        model: config dict (or module) of the segmentor / detector, e.g. a stock config's model.
        method: 'daft' (BN train; the DAFTHook converts BN and zeroes the predictors before the
            first step), 'ft' (BN train, standard init), 'lp' (``feature_extractor`` frozen and its
            BN in eval mode after every ``train()``; heads train).
        predictors: final predictor layers (module paths / globs of the wrapped model); default:
            the head table of :mod:`daft_mm.mm.predictors`; a dict ``{head class: [layers]}``
            adds entries to that table. Their LR multiplier is the config's
            ``daft_head_lr_mult``, applied by DAFTHook at start-up.
        feature_extractor: the pretrained part, frozen under LP (module paths); default
            backbone. Set explicitly, DAFT converts the BN layers in it and no others (default:
            those that loaded pretrained weights, see :func:`daft_mm.mm.settings.conversion_plan`).
        data_preprocessor: used only if the wrapped model's config has none (the Runner passes a
            config's top-level ``data_preprocessor`` here).
        init_cfg: kept for the BaseModel interface; the wrapped model initialises itself.
        **model_overrides: keys of the wrapped model set on the wrapper, as a stock config's
            ``--cfg-options model.backbone.depth=18`` or ``model.pretrained=None`` does: merged
            into ``model`` (the same key there is overridden), so they reach the wrapped model.
    """

    def __init__(self,
                 model: Union[dict, nn.Module],
                 method: str = 'daft',
                 predictors: PredictorSpec = None,
                 feature_extractor: Optional[Sequence[str]] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 **model_overrides: Any) -> None:
        stage = resolve_stage(method)
        if model_overrides:
            model = _merge_overrides(model, model_overrides)
        if isinstance(model, dict):
            # mmengine's Runner adds a config's top-level `data_preprocessor` to the outermost
            # model dict; it belongs to the wrapped model (whose own setting wins).
            if data_preprocessor is not None and 'data_preprocessor' not in model:
                model = dict(model, data_preprocessor=data_preprocessor)
            inner = MODELS.build(model)
        else:
            inner = model
        if not isinstance(inner, BaseModel):
            raise TypeError(f'DAFTModel wraps an mmengine BaseModel (segmentor/detector), got '
                            f'{type(inner).__name__}')
        # The wrapped model's preprocessor is shared, not copied: runners and DDP call
        # ``model.data_preprocessor`` on the outermost model.
        super().__init__(data_preprocessor=inner.data_preprocessor, init_cfg=init_cfg)
        self.model = inner
        self.method = stage.name
        self.stage = stage
        # DAFTHook checks configured predictors against the config's daft_predictors; defaults
        # give way to it.
        self.predictors_configured = predictors is not None
        self.predictors = tuple(predictor_names(inner, predictors, 'model.predictors'))
        # Set explicitly, it also names the pretrained part whose BN layers DAFT converts
        # (otherwise that follows from how the weights were loaded: DAFTHook).
        self.feature_extractor_configured = feature_extractor is not None
        if feature_extractor is None:
            feature_extractor = ('backbone', )
        try:
            self.feature_extractor = tuple(resolve_modules(inner, list(feature_extractor)))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f'model.feature_extractor: {exc.args[0]}. Fix: name the pretrained '
                             "part, e.g. feature_extractor=['backbone']") from None
        if stage.bn_train:
            require_bn_train(inner, 'model.model.', f'method={self.method!r}')
        if stage.freeze_feature_extractor:
            for module in self._feature_modules():
                module.requires_grad_(False)
        # DAFT's preparation (BN conversion, zero predictors) is done by DAFTHook before the first
        # step, or found done in a resumed checkpoint; train_step refuses to run without it.
        self.prepared = not (stage.convert_bn or stage.zero_init_head)
        # compat: torch 2.1 has only the private forms of these two registrations.
        register_state_dict_post_hook(self, _drop_wrapper_prefix)
        register_load_state_dict_pre_hook(self, _add_wrapper_prefix)

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        # Attributes the runner, hooks or visualizers read from the model (``test_cfg``,
        # ``decode_head``, ``roi_head``, ``with_neck``, ...) come from the wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get('_modules', {}).get('model')
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def train_step(self, data: Any, optim_wrapper: Any) -> Dict[str, torch.Tensor]:
        if not self.prepared:
            raise RuntimeError(
                f"method={self.method!r} needs DAFT's preparation (BN conversion"
                f"{', zero predictors' if self.stage.zero_init_head else ''}) before the first "
                "step, which DAFTHook does. Fix: add dict(type='DAFTHook') to custom_hooks "
                "(inherit configs/_base_/daft.py), or use method='ft'")
        return self.model.train_step(data, optim_wrapper)

    def val_step(self, data: Any) -> list:
        return self.model.val_step(data)

    def test_step(self, data: Any) -> list:
        return self.model.test_step(data)

    def train(self, mode: bool = True) -> 'DAFTModel':
        """``train()`` of the wrapped model (its ``norm_eval``/``frozen_stages`` apply), then the
        method's BN policy: LP keeps the feature extractor's BN in eval mode (running statistics
        used and never updated), DAFT/FT leave BN in train mode."""
        super().train(mode)
        if mode and not self.stage.bn_train:
            for module in self._feature_modules():
                set_bn_eval(module)
        return self

    # ------------------------------------------------------------------ DAFT operations
    def convert_bn(self, batches: Iterable[Any], *, forward_mode: str = 'loss',
                   **kwargs: Any) -> ConversionReport:
        """Core :func:`~daft_mm.core.convert_bn` on the wrapped model over mmengine data batches
        (dataloader outputs); ``kwargs`` go to the core function. Layer names in the report are
        the wrapped model's (the stock names)."""
        return convert_bn(self.model, batches, forward=mm_forward(forward_mode), **kwargs)

    def zero_init_predictors(self) -> List[str]:
        """Zero this stage's predictors, each biased by its head's prior (core
        :func:`~daft_mm.core.zero_init_predictors`,
        :func:`~daft_mm.mm.predictors.predictor_priors`).
        """
        names = list(self.predictors)
        return zero_init_predictors(self.model, names, predictor_priors(self.model, names))

    def _feature_modules(self) -> List[nn.Module]:
        modules = dict(self.model.named_modules())
        return [modules[name] for name in self.feature_extractor]


def _merge_overrides(model: Union[dict, nn.Module], overrides: Dict[str, Any]) -> dict:
    """The wrapped model's config with ``overrides`` merged in (mmengine's merge: nested dicts
    key by key, ``_delete_`` honoured). Why: ``--cfg-options model.<key>=...`` written for the
    stock config lands on the wrapper, and would otherwise fail as an unknown argument."""
    keys = ', '.join(f'model.{k}' for k in overrides)
    if not isinstance(model, dict):
        raise TypeError(
            f'DAFTModel got {keys}, which belong to the wrapped model, but the wrapped model is '
            f'an already built {type(model).__name__}. Fix: set them as '
            + ', '.join(f'model.model.{k}' for k in overrides) + ' in a config')
    from mmengine.config import ConfigDict
    from mmengine.logging import print_log
    print_log(f'DAFTModel: {keys} set on the wrapper apply to the wrapped model '
              f'(model.model.*)', logger='current')
    merged = ConfigDict(copy.deepcopy(model))
    merged.merge(overrides)
    return merged


# ---------------------------------------------------------------------- state-dict transparency
_INNER = 'model.'
_SHARED = 'data_preprocessor.'


def _drop_wrapper_prefix(module: nn.Module, state_dict: Dict[str, Any], prefix: str,
                         local_metadata: dict) -> None:
    """Saved keys are the wrapped model's: ``<prefix>model.backbone...`` -> ``<prefix>backbone...``.

    The shared ``data_preprocessor`` appears twice in the module tree; its copy under the wrapper
    is dropped (mmengine preprocessors hold only non-persistent buffers, so normally there is none).
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.startswith(_INNER):
            state_dict[prefix + rest[len(_INNER):]] = state_dict.pop(key)
        elif rest.startswith(_SHARED):
            del state_dict[key]
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        for key in [k for k in metadata if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest == _INNER[:-1]:
                del metadata[key]  # the wrapper's own entry (at prefix[:-1]) stays
            elif rest.startswith(_INNER):
                metadata[prefix + rest[len(_INNER):]] = metadata.pop(key)


def _add_wrapper_prefix(module: nn.Module, state_dict: Dict[str, Any], prefix: str,
                        local_metadata: dict,
                        strict: bool, missing_keys: list, unexpected_keys: list,
                        error_msgs: list) -> None:
    """Loading accepts the wrapped model's keys (stock checkpoints, or ours) by routing them to
    ``model.``; keys already under ``model.`` are taken as they are."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if not rest.startswith(_INNER) and not rest.startswith(_SHARED):
            state_dict[prefix + _INNER + rest] = state_dict.pop(key)
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        # Added next to the originals, never moved: the caller's checkpoint must stay loadable
        # into a stock model afterwards (the metadata carries e.g. BatchNorm's version).
        for key in [k for k in metadata if k.startswith(prefix) and k != prefix[:-1]]:
            rest = key[len(prefix):]
            if not rest.startswith(_INNER) and rest != _INNER[:-1]:
                metadata.setdefault(prefix + _INNER + rest, metadata[key])
