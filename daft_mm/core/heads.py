"""Predictor heads: zero-init, feature-extractor/head parameter groups, LP freezing.

DAFT's integrated LP+FT starts the final predictor(s) at zero and trains them with a
learning rate far above the backbone's, in a single stage. The baselines need the
opposite tools: LP freezes everything below the head and keeps BatchNorm in eval
mode. All of these are small functions over ``nn.Module`` so that the OpenMMLab layer
and the classification API share one implementation.

Layers are named by dotted module paths as in ``model.named_modules()`` (``'fc'``,
``'decode_head.conv_seg'``, ``'roi_head.bbox_head.fc_cls'``), or by fnmatch patterns
(``'*.conv_seg'``); a pattern is any name containing ``*``, ``?`` or ``[``.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .modules import is_batchnorm
from .recipes import HEAD_SCOPES

__all__ = [
    'PREDICTOR_TYPES',
    'resolve_modules',
    'is_predictor_leaf',
    'find_predictors',
    'new_modules',
    'head_modules',
    'zero_init_predictors',
    'split_param_groups',
    'freeze_feature_extractor',
    'set_bn_eval',
    'flush_subnormals',
]

#: Layer types that can be a final predictor: an affine map from features to outputs. Transposed
#: convolutions are affine too (Grid R-CNN's grid points come from a ConvTranspose2d).
PREDICTOR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                 nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                 nn.ConvTranspose3d)

#: A prior bias: one value for every output, or one per output (a tensor of the bias's shape).
Prior = float | torch.Tensor

_GLOB_CHARS = frozenset('*?[')


def _as_name_list(names: str | Iterable[str]) -> list[str]:
    # A bare string is one name, not a sequence of one-letter names.
    listed = [names] if isinstance(names, str) else list(names)
    if not listed:
        raise ValueError('no layer names given')
    for name in listed:
        if not isinstance(name, str) or not name:
            raise TypeError(f'layer names must be non-empty strings, got {name!r}')
    return listed


def resolve_modules(model: nn.Module, names: str | Iterable[str]) -> dict[str, nn.Module]:
    """Map names/patterns to ``{module_path: module}`` in model order, de-duplicated.

    Every name must match at least one module, so a typo fails loudly instead of
    silently training (or zeroing) nothing; the error lists the closest real paths.
    """
    available = dict(model.named_modules(remove_duplicate=False))
    available.pop('', None)  # the root has no path a user could mean
    matched: set[str] = set()
    for name in _as_name_list(names):
        if _GLOB_CHARS.intersection(name):
            hits = [path for path in available if fnmatch.fnmatchcase(path, name)]
        else:
            hits = [name] if name in available else []
        if not hits:
            close = difflib.get_close_matches(name, list(available), n=5, cutoff=0.5)
            hint = f'; close matches: {close}' if close else ''
            raise KeyError(f'no module of {type(model).__name__} matches {name!r}{hint}')
        matched.update(hits)
    return {path: module for path, module in available.items() if path in matched}


def is_predictor_leaf(module: nn.Module) -> bool:
    """An affine map from features to outputs with nothing below it: the only kind of layer DAFT
    may zero (see :func:`zero_init_predictors`)."""
    return (isinstance(module, PREDICTOR_TYPES) and not any(True for _ in module.children())
            and isinstance(getattr(module, 'weight', None), torch.Tensor))


def find_predictors(model: nn.Module, names: str | Iterable[str]) -> dict[str, nn.Module]:
    """Resolve ``names`` to final-predictor-like leaves, or raise without touching anything.

    Exposed so that a training loop can validate its head names up front, before
    other irreversible steps (BN conversion) run.
    """
    modules = resolve_modules(model, names)
    refused = [f'{path} ({type(module).__name__})' for path, module in modules.items()
               if not is_predictor_leaf(module)]
    if refused:
        allowed = ', '.join(t.__name__ for t in PREDICTOR_TYPES)
        raise TypeError(
            f'refusing to zero {refused}: only final predictor leaves ({allowed}) may be '
            'zeroed; zeroing an inner layer would stop all gradient below it')
    return modules


def zero_init_predictors(model: nn.Module, names: str | Iterable[str],
                         priors: Mapping[str, Prior] | None = None) -> list[str]:
    """Zero the weight of the named final predictor layers and set their bias to the prior.

    The bias is 0, or ``priors[path]`` where given: a sigmoid/focal classifier starts at its
    prior probability (``-log((1 - p) / p)``, -4.595 for p = 0.01), not at p = 0.5. Zeroing that
    bias would flood a focal loss with confident false positives in the first steps (RetinaNet:
    loss_cls 108 instead of 1.1). A softmax head has no prior and starts at zero. Returns the
    paths, in model order.

    Only final predictors may be zeroed. For ``y = W h + b`` with ``W = 0`` the
    gradient reaching ``h`` (``W^T dL/dy``) is zero in the first step, but ``W`` itself
    gets ``dL/dy h^T``, which is non-zero because the loss gradient at the output is;
    from the second step on the features below train too. That is DAFT's integrated
    LP+FT: the head moves first, the backbone follows gradually. Zeroing an inner layer
    instead would (a) replace every pretrained feature above it by a constant and
    (b) stop all gradient below it; if the layers above are zero as well, neither
    ever receives a non-zero gradient again. Hence the refusal of anything that is not
    a leaf ``Linear``/``ConvNd``/``ConvTransposeNd`` (see :func:`find_predictors`). Whether a
    leaf is really the *last* layer cannot be seen from the module tree alone; naming it is
    the caller's promise.

    All names and priors are validated before any weight changes, so a bad name or prior
    leaves the model untouched.
    """
    modules = find_predictors(model, names)
    biases = _check_priors(modules, priors or {})
    with torch.no_grad():
        for path, module in modules.items():
            module.weight.zero_()
            if module.bias is not None:
                module.bias.copy_(biases[path])
    return list(modules)


def _check_priors(modules: Mapping[str, nn.Module],
                  priors: Mapping[str, Prior]) -> dict[str, torch.Tensor]:
    """The bias each predictor starts from (0 unless a prior is given), checked up front."""
    unknown = [path for path in priors if path not in modules]
    if unknown:
        raise KeyError(f'priors given for {unknown}, which are not among the predictors '
                       f'{list(modules)}; key priors by the module paths of the predictors')
    biases = {}
    for path, module in modules.items():
        bias = module.bias
        prior = priors.get(path)
        if bias is None:
            if prior is not None and bool(torch.as_tensor(prior).ne(0).any()):
                raise ValueError(f'{path} has no bias, so its prior {prior!r} cannot be set; '
                                 'give no prior for it')
            continue
        value = torch.as_tensor(0.0 if prior is None else prior, dtype=bias.dtype)
        if value.dim() and value.shape != bias.shape:
            raise ValueError(f'prior of {path} has shape {tuple(value.shape)}, its bias '
                             f'{tuple(bias.shape)}; give one number or one per output')
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f'prior of {path} is not finite: {prior!r}')
        biases[path] = value.to(bias.device).expand_as(bias)
    return biases


def new_modules(model: nn.Module, pretrained: str | Iterable[str] = ('backbone', )) -> list[str]:
    """The top-level modules with parameters that are not ``pretrained``: what fine-tuning adds
    to an ImageNet-style backbone (decode / auxiliary heads, necks, detection heads).

    This is the ``'new_modules'`` head scope of the recipes: with a fresh head, all of it is
    random at the start, not only the final predictor, and training it at the backbone's LR
    leaves most of the new head barely trained.
    """
    kept = {id(m) for m in resolve_modules(model, pretrained).values()}
    names = [name for name, module in model.named_children()
             if id(module) not in kept and any(True for _ in module.parameters())]
    if not names:
        raise ValueError(f'{type(model).__name__} has no module with parameters outside '
                         f'{list(_as_name_list(pretrained))}: nothing is new to the pretrained '
                         'model, so there is no head to train faster')
    return names


def head_modules(model: nn.Module, predictors: str | Iterable[str], scope: str,
                 pretrained: str | Iterable[str] = ('backbone', )) -> list[str]:
    """The modules trained at the head LR (and alone under LP) under a head ``scope``, one of
    :data:`~daft_mm.core.recipes.HEAD_SCOPES`: the ``predictors`` themselves, or every module new
    to the ``pretrained`` ones (:func:`new_modules`). The one definition every front end calls."""
    if scope == 'predictors':
        return list(resolve_modules(model, predictors))
    if scope == 'new_modules':
        return new_modules(model, pretrained)
    raise ValueError(f'head_scope must be one of {HEAD_SCOPES}, got {scope!r}')


def _params_by_side(
    model: nn.Module, head_names: str | Iterable[str],
) -> list[tuple[str, nn.Parameter, bool]]:
    """``(name, param, is_head)`` once per parameter object, in model order.

    A parameter object owned both inside and outside the heads (tied weights) is an
    error: it cannot take the head's LR and the backbone's, nor be frozen for one
    and trained for the other.
    """
    heads = resolve_modules(model, head_names)
    for path, head in heads.items():
        if not any(True for _ in head.parameters()):
            raise ValueError(f'head {path!r} ({type(head).__name__}) has no parameters')
    # Decided by module identity, not path prefix, so a module registered under two
    # paths (an alias) still counts as one head.
    inside = {id(sub) for head in heads.values() for sub in head.modules()}
    sides: dict[int, tuple[str, nn.Parameter, bool]] = {}
    for module_path, module in model.named_modules(remove_duplicate=False):
        is_head = id(module) in inside
        for local_name, param in module.named_parameters(recurse=False):
            name = f'{module_path}.{local_name}' if module_path else local_name
            first = sides.setdefault(id(param), (name, param, is_head))
            if first[2] != is_head:
                raise ValueError(
                    f'parameter {first[0]!r} is shared with {name!r} across the '
                    'head/feature-extractor boundary; it would land in both groups')
    return list(sides.values())


def split_param_groups(
    model: nn.Module,
    head_names: str | Iterable[str],
    *,
    lr: float,
    head_lr: float,
    weight_decay: float | None = None,
    head_weight_decay: float | None = None,
) -> list[dict]:
    """Optimizer param groups ``[feature_extractor, head]``, each with a ``'name'`` key.

    Only parameters with ``requires_grad`` are included: the groups then say exactly
    what trains, a frozen backbone (LP) keeps no momentum or weight-decay state, and a
    later unfreeze (LP-FT's second stage) needs a new optimizer, a visible decision
    rather than frozen parameters silently starting to move. So freeze before calling
    this. A group left empty (the feature extractor under LP) is dropped.

    ``weight_decay=None`` leaves the optimizer's default in force;
    ``head_weight_decay=None`` means "same as the feature extractor".
    Raises if a head name matches nothing or a module without parameters, or if one
    parameter object is owned both inside and outside the heads (tied weights).
    """
    groups: dict[str, list[nn.Parameter]] = {'feature_extractor': [], 'head': []}
    for _, param, is_head in _params_by_side(model, head_names):
        if param.requires_grad:
            groups['head' if is_head else 'feature_extractor'].append(param)

    settings = {
        'feature_extractor': (lr, weight_decay),
        'head': (head_lr, weight_decay if head_weight_decay is None else head_weight_decay),
    }
    result = []
    for name, params in groups.items():
        if not params:
            continue
        group_lr, decay = settings[name]
        group: dict = {'name': name, 'params': params, 'lr': group_lr}
        if decay is not None:
            group['weight_decay'] = decay
        result.append(group)
    if not result:
        raise ValueError(f'{type(model).__name__} has no parameter with requires_grad')
    return result


def freeze_feature_extractor(model: nn.Module, head_names: str | Iterable[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter outside the heads (LP).

    Returns the names of the parameters it froze (those that were trainable), so a
    caller can undo exactly this and no more, e.g. for LP-FT's second stage.
    Parameters inside the heads are left as they are.
    """
    frozen = []
    for name, param, is_head in _params_by_side(model, head_names):
        if not is_head and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def set_bn_eval(model: nn.Module) -> int:
    """Put every BatchNorm in eval mode (running stats used, not updated); return the count.

    LP must leave the backbone exactly as pretrained, and a BN in train mode would
    both normalise with batch statistics and overwrite its running stats. Since
    ``model.train()`` resets every submodule, call this after each ``model.train()``.
    """
    count = 0
    for module in model.modules():
        if is_batchnorm(module):  # mmcv's MMSyncBN too
            module.eval()
            count += 1
    return count


@contextmanager
def flush_subnormals(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormal floats to zero on the CPU while training from zero predictors.

    A predictor that starts at zero passes back gradients that are tiny for the first
    steps, and the backward pass through the feature extractor turns many of them into
    subnormal floats (below ~1.2e-38). x86 CPUs compute on those in microcode, one to two
    orders of magnitude slower: a tiny DeepLabV3 step took 4.8 s instead of 0.25 s until
    the head had grown. Flushing them to zero changes no result measurably; GPUs are not
    affected. Yields whether the CPU supports it; restores the default afterwards.
    """
    supported = bool(enabled and torch.set_flush_denormal(True))
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(False)
