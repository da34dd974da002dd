"""Checkpoints loaded without running the code they may carry (fix 2 of :mod:`.compat`).

Checkpoint trust (fix 2). Two problems, one policy:

* torch >= 2.6 loads with ``weights_only=True`` by default, a restricted unpickler that only rebuilds
  tensors, containers and allow-listed globals; mmengine 0.10.7 calls ``torch.load`` without
  ``weights_only``, so resuming from its own checkpoints fails. We extend torch's allow-list
  (``torch.serialization.add_safe_globals``) with exactly what mmengine / mmseg / mmdet checkpoints
  hold.
* torch < 2.6 defaults to ``weights_only=False``: there mmengine's ``torch.load`` would unpickle any
  checkpoint fully, which runs whatever code a crafted file names. torch < 2.4 has no
  ``add_safe_globals`` at all, and its weights-only unpickler cannot rebuild mmengine's message hub
  (``HistoryBuffer``, NumPy arrays), so it can neither be extended nor used as is.

The policy, the same on every torch: checkpoints that daft-mm's loaders read -- local files
(``load_from``, ``--resume``, ``init_cfg=dict(type='Pretrained')``, ``load_checkpoint``,
``tools/convert_checkpoint.py``) and http(s) / ``torchvision://`` / ``open-mmlab://`` URLs -- are
never fully unpickled unless you opt in:

* local files go through :func:`load_checkpoint_file`: torch's own ``weights_only=True`` with the
  allow-list where torch can take it (probed once: ``add_safe_globals`` with ``(callable, name)``
  pairs and allow-listed classes rebuilt; true on torch 2.13), else ``pickle_module=``
  :data:`RESTRICTED_PICKLE` -- a ``pickle.Unpickler`` whose ``find_class`` only returns torch's own
  weights-only globals, the plain data types newer torch allows, and the same allow-list, and
  refuses everything else (Python's documented way to restrict unpickling; what torch 2.1 uses).
  CI tests torch 2.1.2 and 2.13.0; a version between is decided by the same probe;
* URLs go through mmengine's download and torch's ``weights_only=True`` (with the allow-list where
  torch takes one; on older torch its built-in list, which covers plain state dicts);
* other storage backends (pavi, petrel/ceph) are mmengine's own code, unchanged.

For a *trusted* checkpoint that holds other objects (older toolkits, custom hooks) opt in to full
unpickling, which can run arbitrary code:

    DAFT_MM_TRUST_CHECKPOINTS=1 python tools/train.py ...       # environment, or
    daft_mm.mm.compat.trust_checkpoints()                        # from Python

A checkpoint with an unknown global fails with an error that names it and these two opt-ins.
"""
from __future__ import annotations

import _codecs
import _compat_pickle
import importlib
import io
import os
import os.path as osp
import pickle
import re
import types
from typing import Any, Callable

__all__ = ['TRUST_ENV', 'trust_checkpoints', 'checkpoints_trusted', 'checkpoint_safe_globals',
           'allow_mmengine_checkpoint_globals', 'torch_takes_allow_list', 'RESTRICTED_PICKLE',
           'safe_torch_load', 'load_checkpoint_file']

#: Environment variable that opts in to full (unsafe) unpickling of trusted checkpoints.
TRUST_ENV = 'DAFT_MM_TRUST_CHECKPOINTS'
_TRUSTED: bool | None = None  # set by trust_checkpoints(); None -> look at the environment


# ---------------------------------------------------------------------------------------------
# Fix 2: torch.load(weights_only=True) vs mmengine checkpoints
# ---------------------------------------------------------------------------------------------
def trust_checkpoints(enable: bool | None = True) -> None:
    """Opt in (or back out) of full unpickling for checkpoints loaded through mmengine.

    Only for checkpoints from a trusted source: unpickling can execute arbitrary code. ``True`` /
    ``False`` override the ``DAFT_MM_TRUST_CHECKPOINTS`` environment variable for this process;
    ``None`` hands the decision back to it.
    """
    global _TRUSTED
    _TRUSTED = None if enable is None else bool(enable)


def checkpoints_trusted() -> bool:
    """Whether checkpoints are currently fully unpickled (see :func:`trust_checkpoints`)."""
    if _TRUSTED is not None:
        return _TRUSTED
    return os.environ.get(TRUST_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on')


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """A ``getattr`` that only resolves statistics methods of mmengine's ``HistoryBuffer``.

    Pickle protocol 2 stores ``HistoryBuffer.min`` (kept in each buffer's ``_statistics_methods``)
    as ``getattr(HistoryBuffer, 'min')``. Allowing the real ``builtins.getattr`` would let a
    checkpoint fetch any attribute of any allowed object, so only this narrow form is accepted.
    """
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and callable(getattr(HistoryBuffer, name, None)) and (
            name in HistoryBuffer._statistics_methods or name in ('min', 'max', 'current', 'mean')):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({getattr(obj, "__qualname__", type(obj).__name__)}, '
        f'{name!r}), which is outside the allow-list (only HistoryBuffer statistics methods are '
        'allowed)')


def checkpoint_safe_globals() -> list[Callable | tuple[Callable, str]]:
    """Globals that mmengine / mmseg / mmdet training checkpoints hold, besides torch's defaults.

    Found by `torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints the tiny
    DeepLabV3 and Faster R-CNN configs write: the message hub keeps ``HistoryBuffer`` objects of
    NumPy arrays, and metric values (``val/mIoU``, ``pascal_voc/mAP``) as NumPy scalars.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer

    # numpy._core exists on 1.26 too (an alias of numpy.core kept for NumPy 2 pickles), and on
    # NumPy 2 it avoids the deprecated numpy.core.
    multiarray = importlib.import_module('numpy._core.multiarray')
    safe: list[Callable | tuple[Callable, str]] = [
        HistoryBuffer,
        (_history_buffer_getattr, 'builtins.getattr'),
        np.ndarray,
        np.dtype,
        (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy.core.multiarray.scalar'),
        # Checkpoints written under NumPy 2 name the same functions numpy._core.*.
        (multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy._core.multiarray.scalar'),
    ]
    # Unpickling a dtype ends in BUILD on the dtype *instance*, which torch only allows when the
    # instance's class is allow-listed: numpy.dtypes.Float64DType etc. (NumPy >= 1.25). Plain
    # numeric, bool and fixed-width string dtypes only: not object / structured (void) ones.
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        excluded = {'ObjectDType', 'VoidDType', 'StringDType'}
        safe += [getattr(dtypes, n) for n in sorted(dir(dtypes)) if n.endswith('DType')
                 and n not in excluded and isinstance(getattr(dtypes, n), type)]
    return safe


def _global_name(entry: Callable | tuple[Callable, str]) -> tuple[str, Callable]:
    """``(dotted name a pickle uses, object)`` for one :func:`checkpoint_safe_globals` entry."""
    if isinstance(entry, tuple):
        obj, name = entry
        return name, obj
    return f'{entry.__module__}.{entry.__qualname__}', entry


_TAKES_ALLOW_LIST: bool | None = None  # cached result of torch_takes_allow_list()


def torch_takes_allow_list() -> bool:
    """Whether torch's own ``weights_only`` unpickler can load mmengine checkpoints with our list.

    Needs ``torch.serialization.add_safe_globals`` (torch >= 2.4) accepting ``(callable, name)``
    pairs, and an unpickler that rebuilds allow-listed classes (``HistoryBuffer``'s state) and NumPy
    arrays: torch 2.6+ in practice. Probed once, on a small in-memory message-hub checkpoint inside
    the ``torch.serialization.safe_globals`` context, leaving the global list as it was.
    """
    global _TAKES_ALLOW_LIST
    if _TAKES_ALLOW_LIST is None:
        _TAKES_ALLOW_LIST = _probe_allow_list()
    return _TAKES_ALLOW_LIST


def _probe_allow_list() -> bool:
    import numpy as np
    import torch
    from mmengine.logging import HistoryBuffer

    serialization = torch.serialization
    if not (hasattr(serialization, 'add_safe_globals') and hasattr(serialization, 'safe_globals')):
        return False  # torch < 2.5
    buf = HistoryBuffer()
    buf.update(np.float64(0.5))
    data = io.BytesIO()
    torch.save({'hub': buf, 'metric': np.float64(1.5), 'arr': np.arange(2)}, data)
    data.seek(0)
    # The context removes its entries on exit, also ones that were registered before it (by us or
    # another library): put those back.
    before = list(serialization.get_safe_globals()) if hasattr(serialization, 'get_safe_globals') else []
    try:
        with serialization.safe_globals(checkpoint_safe_globals()):
            loaded = torch.load(data, weights_only=True)
        return loaded['hub'].current() == 0.5 and loaded['metric'] == 1.5
    except Exception:  # noqa: BLE001  (any failure means: use the restricted unpickler)
        return False
    finally:
        now = serialization.get_safe_globals() if before else []
        lost = [g for g in before if g not in now]
        if lost:
            serialization.add_safe_globals(lost)


def allow_mmengine_checkpoint_globals() -> None:
    """Extend torch's ``weights_only`` allow-list with :func:`checkpoint_safe_globals`.

    What breaks (torch >= 2.6): ``Runner.resume`` (``--resume``) fails with "Weights only load
    failed ... Unsupported global: GLOBAL mmengine.logging.history_buffer.HistoryBuffer" because
    torch defaults to ``weights_only=True`` and mmengine 0.10.7 passes nothing. Where torch cannot
    take the list (:func:`torch_takes_allow_list` is False: torch < 2.6), nothing is registered and
    :func:`load_checkpoint_file` uses :data:`RESTRICTED_PICKLE` instead.
    """
    import torch
    if torch_takes_allow_list():
        torch.serialization.add_safe_globals(checkpoint_safe_globals())


def _torch_weights_only_globals() -> dict[str, Any]:
    """The globals torch's own weights-only unpickler allows by default (tensors, storages, dtypes,
    ``OrderedDict``...), keyed by dotted name. ``_get_allowed_globals`` is private but present from
    torch 1.13 to 2.13; without it, the few globals a plain state dict needs."""
    import collections

    import torch
    import torch._utils as tu
    getter = getattr(importlib.import_module('torch._weights_only_unpickler'),
                     '_get_allowed_globals', None)
    if getter is not None:
        return dict(getter())
    fallback = [collections.OrderedDict, torch.Size, torch.nn.Parameter, tu._rebuild_tensor_v2,
                tu._rebuild_parameter]
    return {f'{f.__module__}.{f.__qualname__}': f for f in fallback}


def _plain_data_globals() -> dict[str, Any]:
    """Plain data types that torch 2.13's weights-only unpickler allows by default and torch 2.1's
    does not: protocol-2 bytes (``_codecs.encode``, how NumPy array data is pickled),
    ``collections.Counter`` (mmdet's message hub), sets, ``torch.device`` and every dtype."""
    import collections

    import torch
    found = {'_codecs.encode': _codecs.encode, 'collections.Counter': collections.Counter,
             'builtins.set': set, 'builtins.bytearray': bytearray, 'builtins.complex': complex,
             'torch.device': torch.device}
    found.update((f'torch.{name}', value) for name, value in vars(torch).items()
                 if isinstance(value, torch.dtype))
    return found


class _AllowListUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only allow-listed globals (torch's weights-only ones and
    :func:`checkpoint_safe_globals`). Every callable a pickle can call (REDUCE) or class it can build
    (NEWOBJ, BUILD) comes through ``find_class``, so a checkpoint naming ``builtins.exec``,
    ``os.system`` or any other global is refused before anything runs."""

    _allowed: dict[str, Any] | None = None

    @classmethod
    def allowed(cls) -> dict[str, Any]:
        if cls._allowed is None:
            allowed = _torch_weights_only_globals()
            for name, obj in _plain_data_globals().items():
                allowed.setdefault(name, obj)
            allowed.update(_global_name(entry) for entry in checkpoint_safe_globals())
            cls._allowed = allowed
        return cls._allowed

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's default) spell Python 3 names the Python 2 way
        # (``__builtin__.getattr``); pickle's own find_class maps them back, so do the same.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = self.allowed().get(f'{module}.{name}')
        if obj is None:
            raise pickle.UnpicklingError(
                f'Unsupported global: GLOBAL {module}.{name} was not an allowed global')
        return obj


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _AllowListUnpickler(file, **kwargs).load()


#: A stand-in for the ``pickle`` module to pass as ``torch.load(..., pickle_module=...)``: torch
#: subclasses its ``Unpickler`` (keeping the allow-list) and calls its ``load``.
RESTRICTED_PICKLE = types.ModuleType('daft_mm_restricted_pickle')
RESTRICTED_PICKLE.Unpickler = _AllowListUnpickler  # type: ignore[attr-defined]
RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]
RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


# torch >= 2.5 / our unpickler: "GLOBAL x was not an allowed global"; torch 2.1-2.4: "Unsupported
# class x" or "Unsupported operand ..." from its built-in weights-only unpickler.
# torch >= 2.6 for a module it blocks outright (os, posix, subprocess...): "Trying to load
# unsupported GLOBAL posix.system whose module posix is blocked".
_UNSUPPORTED_GLOBAL = re.compile(r'GLOBAL (\S+) (?:was not an allowed global|whose module)'
                                 r'|Unsupported class (\S+)')


def _refused(source: str, err: pickle.UnpicklingError) -> pickle.UnpicklingError:
    """The error for a checkpoint the restricted unpickler refused: what, and the two opt-ins."""
    text = str(err)
    match = _UNSUPPORTED_GLOBAL.search(text)
    if match:
        name = match.group(1) or match.group(2)
        module, _, attr = name.rpartition('.')  # protocol-2 pickles say __builtin__.exec
        module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
        # torch >= 2.6 names a builtin alone (`GLOBAL exec`)
        name = f'{_compat_pickle.IMPORT_MAPPING.get(module, module) or "builtins"}.{attr}'
        what = f'the global `{name}`' + (
            ', from a module torch never unpickles with weights_only (it can run commands)'
            if 'is blocked' in text else ', which is not on the weights_only allow-list')
    else:  # torch puts the specific reason after "WeightsUnpickler error:"
        reason = text.rsplit('WeightsUnpickler error:', 1)[-1].strip().splitlines()
        what = f'an object the weights_only unpickler refused ({reason[0] if reason else text})'
        name = None
    allow = (f'`torch.serialization.add_safe_globals([{name}])` (import it first; torch >= 2.6)'
             if name else '`torch.serialization.add_safe_globals([...])` with the class the '
             'error names (torch >= 2.6)')
    only = ('' if match and 'is blocked' in text else
            f'; or allow just that class with {allow}')
    return pickle.UnpicklingError(
        f'{source} holds {what}. If you trust this file, opt in to full unpickling (it can '
        f'run arbitrary code) with `{TRUST_ENV}=1` in the environment or '
        f'`daft_mm.mm.compat.trust_checkpoints()` in Python{only}.')


def safe_torch_load(file: Any, map_location: Any = None, source: str | None = None) -> Any:
    """``torch.load`` of a path or file object, never fully unpickled unless checkpoints are
    trusted: torch's ``weights_only=True`` with the allow-list, or :data:`RESTRICTED_PICKLE`
    where torch cannot take the list; a refusal names the global and the opt-ins."""
    import torch
    source = source or (str(file) if isinstance(file, (str, os.PathLike)) else 'the checkpoint')
    if checkpoints_trusted():
        return torch.load(file, map_location=map_location, weights_only=False)
    try:
        if torch_takes_allow_list():
            return torch.load(file, map_location=map_location, weights_only=True)
        return torch.load(file, map_location=map_location, weights_only=False,
                          pickle_module=RESTRICTED_PICKLE)
    except pickle.UnpicklingError as err:
        raise _refused(source, err) from err


def load_checkpoint_file(filename: str, map_location: Any = None) -> Any:
    """``torch.load`` a local checkpoint, never fully unpickled unless checkpoints are trusted.

    Same contract as mmengine's ``load_from_local``; the differences are the restricted unpickling
    (:func:`safe_torch_load`) and an error that names the unknown global and the trust opt-in,
    or a truncated file.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return safe_torch_load(filename, map_location, filename)
    except (RuntimeError, EOFError) as err:
        if isinstance(err, EOFError) or 'zip archive' in str(err) or 'central directory' in str(err):
            raise RuntimeError(
                f'{filename} is not a complete checkpoint (truncated or corrupt: '
                f'{str(err).splitlines()[0] if str(err) else type(err).__name__}), e.g. a save '
                'or a copy that was cut off. Fix: use an earlier checkpoint of the run (--resume '
                'falls back to the newest one that is whole), or copy the file again') from err
        raise
