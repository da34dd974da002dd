"""The top-level ``daft_*`` keys of a config and their checks.

The user-facing keys:

* ``daft_predictors``   module paths of the final predictors (zero init, high LR)
* ``daft_head_lr_mult`` the head's LR over the base LR
* ``daft_head_modules`` what "the head" is for that LR: ``'predictors'`` (the final predictors),
  ``'new_modules'`` (every top-level module outside the backbone: decode / auxiliary heads, necks,
  detection heads; the DAFT recipe's default) or a list of module paths. Zero-init stays on the
  predictors.
* ``daft_convert_modules`` which BN layers BN conversion rewrites: unset (default) the ones whose
  weights came from pretrained weights (:func:`daft_mm.mm.plan.conversion_plan`), ``'all'``, or a
  list of module paths.

Why top-level keys: a classic config resolves ``{{_base_.x}}`` when it is parsed, so a value
computed inside ``configs/_base_/daft.py`` would not follow a child's change. The final config's
keys are copied into ``optim_wrapper`` when the config is loaded
(:func:`daft_mm.mm.optim.complete_daft_config`), where the optimizer constructor reads them.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

from daft_mm.core import FineTuneStage, get_recipe
from daft_mm.core.recipes import DAFT_HEAD_LR_MULT

__all__ = ['PREDICTORS_KEY', 'LR_MULT_KEY', 'HEAD_MODULES_KEY', 'CONVERT_MODULES_KEY',
           'KNOWN_KEYS', 'REMOVED_KEYS', 'check_daft_keys', 'head_lr_mult', 'is_daft_config',
           'resolve_stage', 'require_daft_hook', 'hook_config']

PREDICTORS_KEY = 'daft_predictors'
LR_MULT_KEY = 'daft_head_lr_mult'
HEAD_MODULES_KEY = 'daft_head_modules'
CONVERT_MODULES_KEY = 'daft_convert_modules'
#: every top-level ``daft_*`` key the project reads or ships; any other is a typo
KNOWN_KEYS = (PREDICTORS_KEY, LR_MULT_KEY, HEAD_MODULES_KEY, CONVERT_MODULES_KEY,
              'daft_backbone')
#: keys of earlier versions: what replaced them
REMOVED_KEYS = {
    'daft_paramwise_cfg': 'DAFTOptimWrapperConstructor builds the head\'s parameter groups from '
                          f'{LR_MULT_KEY} and {HEAD_MODULES_KEY} when the optimizer is built. Fix: '
                          'delete `daft_paramwise_cfg` and `optim_wrapper = dict(paramwise_cfg='
                          '{{_base_.daft_paramwise_cfg}})` from the config; set '
                          f'{LR_MULT_KEY}=<ratio> instead'}


def check_daft_keys(cfg: Mapping[str, Any]) -> None:
    """Refuse an unknown top-level ``daft_*`` key, naming the closest known one: a misspelt
    ``daft_head_lr_mul=20`` would otherwise train at the default 10x without a word."""
    import difflib
    for key, why in REMOVED_KEYS.items():
        if key in cfg:
            raise ValueError(f'{key} was removed: {why}')
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


def head_lr_mult(cfg: Mapping[str, Any]) -> Tuple[float, str]:
    """(multiplier, where it came from): ``daft_head_lr_mult`` if set, else DAFT's default."""
    if cfg.get(LR_MULT_KEY) is None:
        return DAFT_HEAD_LR_MULT, f'the DAFT default ({LR_MULT_KEY} not set)'
    value = cfg[LR_MULT_KEY]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'{LR_MULT_KEY} must be a positive number (the predictors\' LR over the '
                         f'base LR), got {value!r}. Fix: e.g. --cfg-options {LR_MULT_KEY}=10')
    return float(value), LR_MULT_KEY

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



def hook_config(cfg: Mapping[str, Any]) -> Optional[dict]:
    """The ``DAFTHook`` entry of ``custom_hooks`` (its arguments), or None."""
    for hook in cfg.get('custom_hooks') or []:
        if _hook_type(hook).split('.')[-1] == 'DAFTHook':
            return dict(hook) if isinstance(hook, Mapping) else None
    return None
