"""Fixes needed to run mmengine 0.10.7 / mmcv 2.1 / mmseg 1.2.2 / mmdet 3.3 on torch 2.1 to 2.13,
NumPy 1.26 and setuptools < 82. The one place for such fixes: each is one function, applied once on
import (``import daft_mm`` imports this module), with a comment on what breaks, on which versions,
and how the need is detected (by probing the feature, never by a list of versions).

1. ``pkg_resources`` must exist (setuptools < 82; any torch): checked with a clear ImportError.
2. Checkpoints load with ``weights_only`` semantics and an allow-list on every torch, explicit opt-in.
3. ``--launcher pytorch`` on a machine without an accelerator (gloo), on any torch build.
4. Module state-dict hooks: public on torch 2.13, private only on torch 2.1 (helpers, not patches).
5. ``read_base()`` imports of ``daft_mm.configs`` from an editable install (``pip install -e .``).

Fix 2 lives in :mod:`daft_mm.mm.safe_load` (its docstring states the policy); this module
applies it to mmengine's loaders.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os.path as osp
import pickle
import types
import warnings
from typing import Any, Callable

from .safe_load import (RESTRICTED_PICKLE, TRUST_ENV, _refused,  # noqa: F401
                        allow_mmengine_checkpoint_globals, checkpoint_safe_globals,
                        checkpoints_trusted, load_checkpoint_file, safe_torch_load,
                        torch_takes_allow_list, trust_checkpoints)

__all__ = ['TRUST_ENV', 'trust_checkpoints', 'checkpoints_trusted', 'checkpoint_safe_globals',
           'load_checkpoint_file', 'torch_takes_allow_list', 'RESTRICTED_PICKLE',
           'register_state_dict_post_hook', 'register_load_state_dict_pre_hook']

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


class _TorchWithSafeLoad(types.ModuleType):
    """``torch`` as ``mmengine.runner.checkpoint`` sees it: every attribute is torch's, except
    ``load``, which is :func:`safe_torch_load` (a caller's ``weights_only`` / ``pickle_module``
    are ignored on purpose: the allow-list and the trust opt-in decide)."""

    def __getattr__(self, name: str) -> Any:
        import torch
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
        return safe_torch_load(f, map_location)


def load_every_scheme_safely() -> None:
    """Route the ``torch.load`` of every mmengine checkpoint scheme through
    :func:`safe_torch_load`.

    What breaks: besides the local and URL loaders (fixed above), mmengine's ``pavi://``,
    ``s3://`` / ``petrel://`` and ``open-mmlab://`` (a file in the mmengine home) loaders call a
    bare ``torch.load``, which unpickles fully on torch < 2.6 (the torch 2.1 environment most
    OpenMMLab users have): a crafted checkpoint there runs code. ``mmengine.runner.checkpoint``
    gets a ``torch`` of its own whose ``load`` is the restricted one, so every scheme loader in
    it, present and future, goes through the allow-list.
    """
    from mmengine.runner import checkpoint as ckpt_mod
    if isinstance(ckpt_mod.torch, _TorchWithSafeLoad):
        return
    ckpt_mod.torch = _TorchWithSafeLoad('torch')


def route_local_checkpoints_through_allow_list() -> None:
    """Make mmengine load local checkpoints with :func:`load_checkpoint_file`.

    What breaks: on torch >= 2.6 mmengine's own local loader relies on torch's default
    ``weights_only`` and, when a global is missing from the allow-list, surfaces torch's advice
    (``add_safe_globals``) with no mention of the trust opt-in; on torch < 2.6 it unpickles fully.
    Registered under mmengine's '' (local path) scheme, so it covers ``load_from``, ``resume`` and
    ``load_checkpoint``.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        # The name matters: mmengine logs "Loads checkpoint by <name[10:]> backend".
        return load_checkpoint_file(filename, map_location)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def log_checkpoint_loads() -> None:
    """Send mmengine's "Loads checkpoint by <backend> backend from path" line to the current
    logger, like its other messages.

    What breaks: ``_load_checkpoint`` (behind a ``Pretrained`` init_cfg with a ``prefix`` and
    behind ``Runner.load_checkpoint``, i.e. ``load_from``) passes ``logger=None``, which
    mmengine's ``print_log`` turns into a bare ``print``: the line reaches stdout whatever the
    run's ``log_level``, so a run that logs at ERROR still prints it for every checkpoint.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    original = CheckpointLoader.load_checkpoint.__func__
    if getattr(original, '_daft_mm_logged', False):
        return

    def load_checkpoint(cls: Any, filename: str, map_location: Any = None,
                        logger: Any = 'current') -> Any:
        return original(cls, filename, map_location, 'current' if logger is None else logger)

    load_checkpoint._daft_mm_logged = True  # type: ignore[attr-defined]
    CheckpointLoader.load_checkpoint = classmethod(load_checkpoint)


def load_urls_weights_only() -> None:
    """Make mmengine's URL loaders (http(s)://, torchvision://, open-mmlab://) pass
    ``weights_only=True`` unless checkpoints are trusted.

    What breaks: on torch < 2.6 mmengine's ``load_url`` (``torch.hub.load_state_dict_from_url``)
    unpickles a downloaded file fully. The wrapper passes ``weights_only`` explicitly, so the
    download is unpickled the way torch >= 2.6 does by default; detected by ``load_url`` taking a
    ``weights_only`` argument (torch >= 1.13), else left as it is.
    """
    from mmengine.runner import checkpoint as ckpt_mod

    original = ckpt_mod.load_url
    if getattr(original, '_daft_mm_weights_only', False):
        return
    try:
        takes = 'weights_only' in inspect.signature(original).parameters
    except (TypeError, ValueError):
        takes = False
    if not takes:
        return

    def load_url(url: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault('weights_only', not checkpoints_trusted())
        try:
            return original(url, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise _refused(url, err) from err

    load_url._daft_mm_weights_only = True  # type: ignore[attr-defined]
    ckpt_mod.load_url = load_url


# ---------------------------------------------------------------------------------------------
# Fix 3: distributed launch on CPU-only torch
# ---------------------------------------------------------------------------------------------
def allow_cpu_pytorch_launcher() -> None:
    """Let ``--launcher pytorch`` (``tools/dist_train.sh``) start on a CPU-only torch build.

    What breaks: mmengine's ``_init_dist_pytorch`` calls ``torch.cuda.set_device(local_rank)``
    before ``init_process_group`` whatever the backend; on a CPU build of torch 2.13 that raises
    ``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'``, and with a CUDA build
    on a machine without a GPU (torch 2.1.2 from PyPI on a CPU machine) ``RuntimeError: Found no
    NVIDIA driver``, so even a gloo run dies at start-up. Without CUDA (or another accelerator) we skip the device selection and
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


# ---------------------------------------------------------------------------------------------
# Fix 4: state-dict hooks (torch 2.1 has only the private forms)
# ---------------------------------------------------------------------------------------------
def register_state_dict_post_hook(module: Any, hook: Callable[..., None]) -> Any:
    """``module.register_state_dict_post_hook(hook)`` on any torch; returns the removable handle.

    What breaks: torch 2.1 has no public ``register_state_dict_post_hook`` (AttributeError when
    ``DAFTModel`` is built). Its private ``_register_state_dict_hook`` calls the hook the same way,
    ``hook(module, state_dict, prefix, local_metadata)``, and only differs in also accepting a
    returned replacement dict, which in-place hooks (returning None) never use.
    """
    import torch.nn as nn
    if hasattr(nn.Module, 'register_state_dict_post_hook'):
        return module.register_state_dict_post_hook(hook)
    return module._register_state_dict_hook(hook)


def register_load_state_dict_pre_hook(module: Any, hook: Callable[..., None]) -> Any:
    """``module.register_load_state_dict_pre_hook(hook)`` on any torch; returns the handle.

    What breaks: torch 2.1 has no public ``register_load_state_dict_pre_hook``. Its private
    ``_register_load_state_dict_pre_hook(hook, with_module=True)`` calls
    ``hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
    error_msgs)``, the public form's signature.
    """
    import torch.nn as nn
    if hasattr(nn.Module, 'register_load_state_dict_pre_hook'):
        return module.register_load_state_dict_pre_hook(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def find_configs_of_editable_installs() -> None:
    """Let ``with read_base(): from daft_mm.configs.x import *`` find the file when daft-mm is
    installed editable.

    What breaks: mmengine 0.10.7 resolves the package of an absolute ``read_base`` import with
    ``get_installed_path``, i.e. its distribution's location joined with the package name. An
    editable install by pip >= 21.3 / setuptools >= 64 (PEP 660) puts only a path finder in
    site-packages, so that folder does not exist and the config is "not found". Detected by the
    path missing: then the folder Python imports the package from (``find_spec``) is used.
    """
    import mmengine.config.config as config_module
    original = config_module.get_installed_path
    if getattr(original, '_daft_mm_fallback', False):
        return

    def get_installed_path(package: str) -> str:
        path = original(package)
        if not osp.isdir(path):
            spec = importlib.util.find_spec(package)
            if spec is not None and spec.origin is not None:
                return osp.dirname(spec.origin)
        return path

    get_installed_path._daft_mm_fallback = True  # type: ignore[attr-defined]
    config_module.get_installed_path = get_installed_path


def apply_all() -> None:
    """Apply every fix once (idempotent). Called on import."""
    require_pkg_resources()
    silence_pkg_resources_deprecation()
    allow_mmengine_checkpoint_globals()
    route_local_checkpoints_through_allow_list()
    load_every_scheme_safely()
    log_checkpoint_loads()
    load_urls_weights_only()
    allow_cpu_pytorch_launcher()
    find_configs_of_editable_installs()


apply_all()
