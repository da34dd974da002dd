"""Can DAFT take this model? One call checks an mmseg / mmdet model end to end on a few batches:

    from daft_mm.mm.doctor import check_model
    print(check_model(model, [batch1, batch2]))   # data batches as a dataloader yields them

1. **predictors**: the head table finds the final predictors, each a predictor leaf;
2. **BN train**: no BatchNorm is kept from training (``norm_eval``, ``frozen_stages``,
   ``requires_grad=False``); the error names each key and its fix;
3. **conversion**: ``convert_bn`` reaches every BN-like layer and keeps the eval-mode function
   (max abs difference of the outputs relative to max(1, |output|) <= 1e-4; where float32 misses
   that, redone in float64 on a copy: a discontinuous eval step, such as SOLO's exact local-maximum
   test, can turn float32 rounding into a visible change). Every layer is taken so that every
   layer type is proven convertible; a DAFT run converts the pretrained ones
   (``rule_converted`` / ``rule_left_new``);
4. **priors**: after zero-init every predictor has weight 0 and, where the model's own init gives
   its bias a constant non-zero value (focal / sigmoid classifiers), exactly that bias;
5. **train step**: one SGD step in train mode runs and gives finite losses.

The model is changed (converted, zeroed, one step trained): check a copy you do not need.
``tools/check_zoo_coverage.py`` runs this on one config of every BN-ResNet folder of the zoo.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from daft_mm.core import find_batchnorms, make_plan, prepare, split_batchnorms

from .predictors import check_predictors, default_predictors, predictor_priors
from .preparation import mm_forward, require_bn_train

__all__ = ['ModelCheck', 'ModelCheckError', 'check_model', 'eval_outputs',
           'float64_function_diff']

#: the stages of :func:`check_model`, in order
STAGES = ('predictors', 'bn-train', 'conversion', 'priors', 'train-step')


@dataclass
class ModelCheck:
    """What :func:`check_model` found (filled in as far as it got)."""

    stage: str = 'predictors'  # the stage reached
    predictors: List[str] = field(default_factory=list)
    priors: Dict[str, float] = field(default_factory=dict)  # path -> first prior value
    stays_frozen: List[str] = field(default_factory=list)  # stem BN kept by frozen_stages=0
    bn_layers: int = 0
    converted: int = 0  # by the function check: every BN-like layer
    pretrained: List[str] = field(default_factory=list)
    rule_converted: List[str] = field(default_factory=list)  # what a DAFT run converts
    rule_left_new: List[str] = field(default_factory=list)  # ... and leaves as initialised
    function_diff: Optional[float] = None
    function_diff_float32: Optional[float] = None  # set where the check was redone in float64
    train_step: str = ''


class ModelCheckError(RuntimeError):
    """A stage failed; ``stage`` names it, ``check`` holds what was found before."""

    def __init__(self, stage: str, check: ModelCheck, cause: BaseException) -> None:
        super().__init__(f'[{stage}] {type(cause).__name__}: {cause}')
        self.stage, self.check, self.cause = stage, check, cause


def check_model(model: nn.Module, batches: Sequence[Any], *,
                pretrained: Sequence[str] = ('backbone', ), train_step: bool = True,
                static: bool = False, key_prefix: str = 'model.') -> ModelCheck:
    """Run the checks above on ``model`` (a segmentor / detector) with ``batches`` (two or more
    mmengine data batches). ``pretrained``: the modules that load pretrained weights (for the
    rule columns); ``static``: predictors, BN train and priors only (no forward pass);
    ``key_prefix``: how config keys are named in errors. Raises :class:`ModelCheckError`."""
    check = ModelCheck()
    try:
        _run(model, batches, check, list(pretrained), train_step, static, key_prefix)
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage it failed at
        raise ModelCheckError(check.stage, check, exc) from exc
    return check


def _run(model: nn.Module, batches: Sequence[Any], check: ModelCheck, pretrained: List[str],
         train_step: bool, static: bool, key_prefix: str) -> None:
    from mmengine.model import revert_sync_batchnorm
    names = check.predictors = check_predictors(model, default_predictors(model), 'predictors')
    check.stage = 'bn-train'
    check.stays_frozen = require_bn_train(model, key_prefix, 'DAFT')
    check.stage = 'conversion'
    check.bn_layers = len(find_batchnorms(model))
    modules = dict(model.named_modules())
    check.pretrained = [p for p in pretrained if p in modules]
    check.rule_converted, check.rule_left_new = split_batchnorms(model, check.pretrained)
    fresh = {n: m.bias.detach().clone() for n, m in model.named_modules(remove_duplicate=False)
             if n in names and getattr(m, 'bias', None) is not None}
    if not static:
        _check_function(model, batches, check)
    check.stage = 'priors'
    priors = predictor_priors(model, names)
    prepare(model, None, make_plan(model, pretrained=None, predictors=names, convert=False,
                                   priors=priors))
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in names:
        layer = modules[name]
        assert not layer.weight.any(), f'{name}: weight not zero'
        if name in priors:
            check.priors[name] = round(float(priors[name].flatten()[0]), 3)
        if layer.bias is None or static:
            continue
        init = fresh[name]
        constant = bool((init == init.flatten()[0]).all()) and bool(init.ne(0).any())
        if name in priors:
            if not torch.equal(layer.bias, init.to(layer.bias)):
                raise AssertionError(f'{name}: prior {priors[name]} differs from the model\'s '
                                     f'init {init}')
        elif constant:
            raise AssertionError(f'{name}: prior bias {float(init.flatten()[0]):.3f} erased')
        elif layer.bias.any():
            raise AssertionError(f'{name}: bias not zero')
    check.stage = 'train-step'
    if static:
        check.train_step = 'static checks only'
    elif train_step:
        check.train_step = _train_step(revert_sync_batchnorm(model), batches[0], names)


def _check_function(model: nn.Module, batches: Sequence[Any], check: ModelCheck) -> None:
    mode, before = eval_outputs(model, batches)
    unconverted_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = _convert_all(model, batches)
    check.converted = len(report.layers)
    if report.skipped:
        raise AssertionError(f'BN layers left unconverted: {dict(report.skipped)}')
    _, after = eval_outputs(model, batches)
    diff = check.function_diff = _max_diff(before, after)
    if len(before) == len(after) and not diff <= 1e-4:
        # exact in real arithmetic: redo in float64, where a real error of the conversion stays
        check.function_diff_float32 = diff
        try:
            diff = check.function_diff = float64_function_diff(model, unconverted_state, batches)
        except Exception as exc:  # noqa: BLE001 - a model that cannot run in float64
            raise AssertionError(f'conversion changed the function ({mode} outputs differ by '
                                 f'{diff:.3g}, relative, in float32) and the float64 check '
                                 f'could not run ({type(exc).__name__}: {exc})') from exc
    if len(before) != len(after) or not diff <= 1e-4:
        raise AssertionError(f'conversion changed the function ({mode} outputs differ by '
                             f'{diff:.3g}, relative)')


def _convert_all(model: nn.Module, batches: Sequence[Any]) -> Any:
    """Every BN-like layer converted (each layer type proven convertible), through the one
    preparation DAFT runs, without zero-init."""
    plan = make_plan(model, pretrained=None, predictors=(), zero_init=False, convert_scope='all')
    return prepare(model, batches, plan, forward=mm_forward('loss')).report


def _flatten(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().double()]  # float64: the float64 check's residual stays visible
    if hasattr(out, 'seg_logits'):  # mmseg predictions
        return _flatten(out.seg_logits.data)
    if hasattr(out, 'pred_instances'):  # mmdet predictions: scores and boxes
        pred = out.pred_instances
        return _flatten([getattr(pred, k) for k in ('scores', 'bboxes') if k in pred])
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _flatten(out[key])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    return []


def eval_outputs(model: nn.Module, batches: Sequence[dict]) -> Tuple[str, List[torch.Tensor]]:
    """Eval-mode outputs: ``tensor`` mode, else the predictions, else the losses (fixed seeds:
    RoI and point sampling)."""
    model.eval()
    for mode in ('tensor', 'predict', 'loss'):
        outs: List[torch.Tensor] = []
        try:
            with torch.no_grad():
                for batch in batches:
                    torch.manual_seed(0)
                    outs += _flatten(mm_forward(mode)(model, batch))
        except Exception:  # noqa: BLE001 - not every model has every mode
            if mode == 'loss':
                raise
            continue
        if outs:
            return mode, outs
    return 'loss', []


def _max_diff(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """Max abs difference relative to each output's magnitude (max(1, |a|)): float32 rounding of
    large logits is not a change of function."""
    return max((float((a - b).abs().max()) / max(1.0, float(a.abs().max()))
                for a, b in zip(before, after) if a.numel()), default=0.0)


def _to_float64(x: Any) -> Any:
    """Floating tensors to float64, in tensors, lists, dicts and data samples (boxes, ...)."""
    from mmengine.structures import BaseDataElement
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float64(t) for t in x)
    if isinstance(x, dict):
        return {k: _to_float64(v) for k, v in x.items()}
    if isinstance(x, BaseDataElement):
        for key in list(x.keys()):
            setattr(x, key, _to_float64(getattr(x, key)))
    return x


def _inputs_to_float64(module: nn.Module, args: Any, out: Any) -> Any:
    """Forward hook on the data preprocessor: what it gives the model, in float64."""
    return _to_float64(out)


def float64_function_diff(model: nn.Module, unconverted_state: Dict[str, torch.Tensor],
                          batches: Sequence[dict]) -> float:
    """The function check redone in float64 on a copy of the model as it was before conversion:
    eval outputs, ``convert_bn``, eval outputs again."""
    copied = copy.deepcopy(model)
    copied.load_state_dict(unconverted_state)
    batches = copy.deepcopy(batches)  # their data samples are cast to float64 in place
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tensors the model makes on the fly (coordinates)
    handle = copied.data_preprocessor.register_forward_hook(_inputs_to_float64)
    try:
        copied.double()
        _, before = eval_outputs(copied, batches)
        _convert_all(copied, batches)
        _, after = eval_outputs(copied, batches)
    finally:
        handle.remove()
        torch.set_default_dtype(default)
    if len(before) != len(after):
        return math.inf
    return _max_diff(before, after)


# ---------------------------------------------------------------------------------- the checks
def _train_step(model: nn.Module, batch: dict, names: Sequence[str]) -> str:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    try:
        losses = mm_forward('loss')(model, batch)
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        if 'cuda' in str(exc).lower() or 'gpu' in str(exc).lower():
            return 'needs CUDA'
        raise
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(t.sum() for t in v)
                for k, v in losses.items() if 'loss' in k)
    if not math.isfinite(float(total)):
        raise AssertionError(f'non-finite loss {float(total)}')
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    modules = dict(model.named_modules(remove_duplicate=False))
    grads = [n for n in names if modules[n].weight.grad is not None
             and bool(modules[n].weight.grad.any())]
    return f'loss {float(total):.3g}, {len(grads)}/{len(names)} predictors got gradient'
