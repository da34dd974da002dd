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
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from torch import nn

from daft_mm.core import resolve_modules, set_bn_eval
from daft_mm.mm.compat import register_load_state_dict_pre_hook, register_state_dict_post_hook

from ..predictors import PredictorSpec, predictor_names
from ..preparation import require_bn_train
from ..settings import resolve_stage

__all__ = ['DAFTModel']


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
            those that loaded pretrained weights, see :func:`daft_mm.mm.plan.conversion_plan`).
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
