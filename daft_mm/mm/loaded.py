"""Which modules a checkpoint actually fills: the facts BN conversion decides from.

Conversion keeps a *pretrained* function, so what counts is what loaded, not what a config
declared: mmengine's ``Pretrained`` init and ``load_from`` both load non-strictly and only log the
keys they missed, so a wrong ``prefix``, a checkpoint of another depth or a backbone-only file
under ``load_from`` would otherwise pass for pretrained weights. Every judgement here compares
keys and shapes (after the ``prefix`` a ``Pretrained`` init strips), module by module.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

__all__ = ['init_cfg_pretrained', 'init_cfg_loaded', 'checkpoint_shapes', 'own_shapes',
           'checkpoint_pretrained', 'fitting_prefix']


def _pretrained_entry(init_cfg: Any) -> Optional[Mapping[str, Any]]:
    """The ``Pretrained`` entry of an mmengine ``init_cfg`` (dict or list), if any."""
    for entry in init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]:
        if isinstance(entry, Mapping) and entry.get('type') in ('Pretrained', 'PretrainedInit'):
            return entry
    return None


def init_cfg_pretrained(net: nn.Module) -> Dict[str, str]:
    """Modules that *declare* pretrained weights through their ``init_cfg`` (``model.pretrained``
    of mmseg / mmdet becomes the backbone's ``init_cfg``): ``{module path: why}``, outermost
    only. What they really load is :func:`init_cfg_loaded`."""
    found: Dict[str, str] = {}
    for path, module in net.named_modules():
        if any(path == p or path.startswith(f'{p}.') for p in found) and path:
            continue
        entry = _pretrained_entry(getattr(module, 'init_cfg', None))
        if entry is not None:
            found[path] = f'init_cfg Pretrained {entry.get("checkpoint")}'
    return found


def checkpoint_shapes(state_dict: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of a checkpoint's state dict, keys as mmengine loads them (a leading
    ``module.`` of a DDP-wrapped save dropped)."""
    return {re.sub(r'^module\.', '', k): tuple(getattr(v, 'shape', ()))
            for k, v in state_dict.items()}


def own_shapes(net: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of a module's weights and buffers (step counters left out): what a
    checkpoint must hold to fill it."""
    return {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith('num_batches_tracked')}


def checkpoint_pretrained(net: nn.Module, state_dict: Mapping[str, Any],
                          source: str) -> Dict[str, str]:
    """Modules whose every weight and buffer a checkpoint's ``state_dict`` holds with the same
    shape (what ``load_from`` loads into them): ``{module path: why}``, outermost only. A head
    whose predictor has another number of classes is not whole; its other layers still count."""
    shapes = checkpoint_shapes(state_dict)
    own = own_shapes(net)
    found: Dict[str, str] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        keys = [k for k in own if k.startswith(prefix)]
        if not keys:
            return
        if all(shapes.get(k) == own[k] for k in keys):
            found[prefix[:-1]] = f'load_from {source}'
            return
        for name, child in module.named_children():
            visit(f'{prefix}{name}.', child)

    for name, child in net.named_children():
        visit(f'{name}.', child)
    return found


def fitting_prefix(state_dict: Mapping[str, Any], own: Mapping[str, Tuple[int, ...]]
                   ) -> Tuple[Optional[str], int]:
    """The key prefix under which most of ``own``'s tensors (``{key: shape}``) appear in a
    checkpoint with their shapes, and how many: ``('model.backbone.', 132)`` for a whole model's
    checkpoint read for its backbone; ``(None, 0)`` when none fits under any prefix."""
    fits: Counter = Counter()
    for key, shape in checkpoint_shapes(state_dict).items():
        parts = key.split('.')
        for i in range(len(parts)):
            if own.get('.'.join(parts[i:])) == shape:
                fits['.'.join(parts[:i]) + ('.' if i else '')] += 1
    if not fits:
        return None, 0
    return fits.most_common(1)[0]


def _read_state(checkpoint: str) -> Mapping[str, Any]:
    """A checkpoint's state dict, read as mmengine's Pretrained init reads it (local files
    through the project's restricted unpickling; URLs from the download cache mmengine fills)."""
    from mmengine.runner.checkpoint import _load_checkpoint
    saved = _load_checkpoint(checkpoint, map_location='cpu')
    return saved.get('state_dict', saved) if isinstance(saved, Mapping) else {}


def init_cfg_loaded(net: nn.Module) -> Tuple[Dict[str, str], Tuple[str, ...]]:
    """What the ``Pretrained`` init_cfgs of ``net`` actually fill: ``({module path: why},
    notes)``. A module whose every tensor is in its checkpoint (under its ``prefix``, same
    shape) is pretrained; of a partly filled one only its wholly filled submodules are (so a BN
    layer counts only if its own weights and statistics loaded); one filled by nothing is new.
    The notes say which modules were partly or not filled, and the ``prefix`` that would fill
    them when the checkpoint holds their keys under another."""
    found: Dict[str, str] = {}
    notes = []
    for path, why in init_cfg_pretrained(net).items():
        module = net.get_submodule(path) if path else net
        entry = _pretrained_entry(module.init_cfg)
        checkpoint, prefix = str(entry.get('checkpoint')), entry.get('prefix') or ''
        if prefix and not prefix.endswith('.'):  # mmengine's Pretrained init adds the dot too
            prefix += '.'
        full = _read_state(checkpoint)
        state = ({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
                 if prefix else full)
        own = own_shapes(module)
        shapes = checkpoint_shapes(state)
        filled = sum(shapes.get(k) == shape for k, shape in own.items())
        if filled == len(own):
            found[path] = why
            continue
        name = path or '(the whole model)'
        if filled:
            parts = checkpoint_pretrained(module, state, checkpoint)
            for sub in parts:
                found[f'{path}.{sub}' if path else sub] = f'{why}, part of {name}'
            notes.append(f'{name}: its init_cfg Pretrained {checkpoint} fills {filled} of its '
                         f'{len(own)} tensors: only its {len(parts)} wholly filled module(s) '
                         'count as pretrained; its other BN layers stay as initialised')
            continue
        note = (f'{name}: its init_cfg Pretrained {checkpoint}'
                + (f" (prefix='{prefix}')" if prefix else '')
                + f' fills none of its {len(own)} tensors: counted as new')
        best, n = fitting_prefix(full, own)
        if n:
            note += (f'; {n} of them are in the file under the prefix {best!r}: set '
                     f"init_cfg=dict(type='Pretrained', checkpoint=..., prefix={best!r})"
                     if best else '; the file holds them without a prefix: drop prefix')
        notes.append(note)
    return found, tuple(notes)
