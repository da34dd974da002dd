"""Fixes needed to run mmengine 0.10.7 / mmcv 2.1 / mmseg 1.2.2 / mmdet 3.3 on torch 2.13,
NumPy 1.26 and setuptools < 82. The one place for such fixes: each is one function, applied once
on import (``import daft_mm`` imports this module), with a comment on what breaks and why.

1. ``pkg_resources`` must exist (setuptools < 82): checked with a clear ImportError.
2. ``torch.load(weights_only=True)``: an allow-list for mmengine checkpoints, explicit opt-in.
3. ``--launcher pytorch`` on a CPU-only torch build (gloo).

Checkpoint trust (fix 2). torch >= 2.6 loads checkpoints with ``weights_only=True``: a restricted
unpickler that only rebuilds tensors, containers and allow-listed globals. mmengine 0.10.7 calls
``torch.load`` without ``weights_only``, so resuming from its own checkpoints fails. We extend the
allow-list with exactly what mmengine / mmseg / mmdet checkpoints hold, and keep
``weights_only=True``.
For a *trusted* checkpoint that holds other objects (older toolkits, custom hooks) opt in to full
unpickling, which can run arbitrary code:

    DAFT_MM_TRUST_CHECKPOINTS=1 python tools/train.py ...       # environment, or
    daft_mm.mm.compat.trust_checkpoints()                        # from Python

A checkpoint with an unknown global fails with an error that names it and these two opt-ins.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import os.path as osp
import pickle
import re
import warnings
from typing import Any, Callable

__all__ = ['TRUST_ENV', 'trust_checkpoints', 'checkpoints_trusted', 'checkpoint_safe_globals',
           'load_checkpoint_file']

#: Environment variable that opts in to full (unsafe) unpickling of trusted checkpoints.
TRUST_ENV = 'DAFT_MM_TRUST_CHECKPOINTS'
_TRUSTED: bool | None = None  # set by trust_checkpoints(); None -> look at the environment


# ---------------------------------------------------------------------------------------------
# Fix 1: pkg_resources (setuptools < 82)
# ---------------------------------------------------------------------------------------------
def require_pkg_resources() -> None:
    """Fail early and clearly when ``pkg_resources`` is missing.

    What breaks: mmengine 0.10.7 imports ``pkg_resources`` (lazily, in
    ``mmengine.utils.package_utils``) to locate installed OpenMMLab packages. Every config with an
    ``mmseg::`` / ``mmdet::`` base needs it, and setuptools 82 removed the module, so without this
    check the failure surfaces deep inside ``Config.fromfile`` as a bare ModuleNotFoundError.
    """
    if importlib.util.find_spec('pkg_resources') is None:
        raise ImportError(
            'daft_mm needs `pkg_resources` (from setuptools < 82): mmengine 0.10.7 uses it to '
            'resolve `mmseg::` / `mmdet::` config bases. Reinstall the pinned stack with '
            '`bash tools/install.sh`, or run `pip install "setuptools>=77.0.3,<82"` in this '
            'environment.')


def silence_pkg_resources_deprecation() -> None:
    """Hide setuptools' "pkg_resources is deprecated" UserWarning.

    What breaks: nothing, but the warning is printed twice on every config load with an
    ``mmseg::`` / ``mmdet::`` base, burying real warnings. The pin to setuptools < 82 is
    deliberate (fix 1), so the warning carries no information for users of this stack.
    """
    warnings.filterwarnings(
        'ignore', message=r'pkg_resources is deprecated as an API', category=UserWarning)


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


def allow_mmengine_checkpoint_globals() -> None:
    """Extend torch's ``weights_only`` allow-list with :func:`checkpoint_safe_globals`.

    What breaks: ``Runner.resume`` (``--resume``) fails with "Weights only load failed ...
    Unsupported global: GLOBAL mmengine.logging.history_buffer.HistoryBuffer" because torch 2.6+
    defaults to ``weights_only=True`` and mmengine 0.10.7 passes nothing.
    """
    import torch
    torch.serialization.add_safe_globals(checkpoint_safe_globals())


_UNSUPPORTED_GLOBAL = re.compile(r'GLOBAL (\S+) was not an allowed global')


def load_checkpoint_file(filename: str, map_location: Any = None) -> Any:
    """``torch.load`` a local checkpoint, ``weights_only`` unless checkpoints are trusted.

    Same contract as mmengine's ``load_from_local``; the difference is the explicit
    ``weights_only`` and an error that names the unknown global and the trust opt-in.
    """
    import torch
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if checkpoints_trusted():
        return torch.load(filename, map_location=map_location, weights_only=False)
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        match = _UNSUPPORTED_GLOBAL.search(text)
        if match:
            what = f'the global `{match.group(1)}`, which is not on the weights_only allow-list'
        else:  # torch puts the specific reason after "WeightsUnpickler error:"
            reason = text.rsplit('WeightsUnpickler error:', 1)[-1].strip().splitlines()
            what = f'an object the weights_only unpickler refused ({reason[0] if reason else text})'
        raise pickle.UnpicklingError(
            f'{filename} holds {what}. If you trust this file, opt in to full unpickling (it can '
            f'run arbitrary code) with `{TRUST_ENV}=1` in the environment or '
            '`daft_mm.mm.compat.trust_checkpoints()` in Python; or allow just that class with '
            '`torch.serialization.add_safe_globals([...])`.') from err


def route_local_checkpoints_through_allow_list() -> None:
    """Make mmengine load local checkpoints with :func:`load_checkpoint_file`.

    What breaks: mmengine's own local loader relies on torch's default ``weights_only`` and, when
    a global is missing from the allow-list, surfaces torch's advice (``add_safe_globals``) with
    no mention of the trust opt-in. Registered under mmengine's '' (local path) scheme, so it
    covers ``load_from``, ``resume`` and ``load_checkpoint``; URL schemes stay as they are.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        # The name matters: mmengine logs "Loads checkpoint by <name[10:]> backend".
        return load_checkpoint_file(filename, map_location)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


# ---------------------------------------------------------------------------------------------
# Fix 3: distributed launch on CPU-only torch
# ---------------------------------------------------------------------------------------------
def allow_cpu_pytorch_launcher() -> None:
    """Let ``--launcher pytorch`` (``tools/dist_train.sh``) start on a CPU-only torch build.

    What breaks: mmengine's ``_init_dist_pytorch`` calls ``torch.cuda.set_device(local_rank)``
    before ``init_process_group`` whatever the backend; on a CPU build of torch 2.13 that raises
    ``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'``, so even a gloo run
    dies at start-up. Without CUDA (or another accelerator) we skip the device selection and
    initialise the process group directly; with one, mmengine's own code runs unchanged.
    """
    import torch
    from mmengine.device import is_mlu_available, is_musa_available, is_npu_available
    from mmengine.dist import utils as dist_utils

    original = dist_utils._init_dist_pytorch
    if getattr(original, '_daft_mm_cpu_fix', False):
        return

    def _init_dist_pytorch(backend: str, init_backend: str = 'torch', **kwargs: Any) -> None:
        accelerator = (torch.cuda.is_available() or is_mlu_available() or is_npu_available()
                       or is_musa_available())
        if accelerator or init_backend != 'torch':
            return original(backend, init_backend=init_backend, **kwargs)
        if backend not in ('gloo', 'mpi'):
            raise RuntimeError(
                f'distributed backend {backend!r} needs GPUs, and this torch has no CUDA. On CPU '
                "use gloo: env_cfg = dict(dist_cfg=dict(backend='gloo')) in the config, or "
                '--cfg-options env_cfg.dist_cfg.backend=gloo')
        torch.distributed.init_process_group(backend=backend, **kwargs)

    _init_dist_pytorch._daft_mm_cpu_fix = True  # type: ignore[attr-defined]
    dist_utils._init_dist_pytorch = _init_dist_pytorch


def apply_all() -> None:
    """Apply every fix once (idempotent). Called on import."""
    require_pkg_resources()
    silence_pkg_resources_deprecation()
    allow_mmengine_checkpoint_globals()
    route_local_checkpoints_through_allow_list()
    allow_cpu_pytorch_launcher()


apply_all()
