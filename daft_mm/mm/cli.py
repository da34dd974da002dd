"""What ``tools/train.py`` and ``tools/test.py`` share: one tool set for segmentation (mmseg) and
detection (mmdet) configs, told apart by the config's registry scope.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, Iterator, Mapping, Sequence

from mmengine.config import Config
from mmengine.hooks import Hook

__all__ = ['TASKS', 'detect_task', 'set_data_root', 'load_config', 'format_metrics',
           'apply_cfg_options', 'distributed_on_cpu', 'close_distributed', 'checkpoint_mismatch',
           'dataset_roots']

#: default_scope -> task name
TASKS = {'mmseg': 'seg', 'mmdet': 'det'}
_DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def detect_task(cfg: Config) -> str:
    """``'seg'`` or ``'det'``: from ``default_scope``, else from the registry holding the model."""
    scope = cfg.get('default_scope')
    if scope in TASKS:
        return TASKS[scope]
    model_type = (cfg.get('model') or {}).get('type')
    if isinstance(model_type, str):
        from mmdet.registry import MODELS as DET_MODELS
        from mmseg.registry import MODELS as SEG_MODELS
        in_seg = model_type in SEG_MODELS.module_dict
        in_det = model_type in DET_MODELS.module_dict
        if in_seg != in_det:
            return 'seg' if in_seg else 'det'
    raise ValueError(
        f'cannot tell whether {cfg.filename or "the config"} is a segmentation or a detection '
        f"config (default_scope={scope!r}, model.type={model_type!r}); inherit mmseg's or "
        "mmdet's default_runtime, or set default_scope = 'mmseg' / 'mmdet' in the config.")


def _datasets(cfg: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(config key, dataset dict)`` of every dataloader's dataset and of the datasets it wraps
    (``dataset`` of RepeatDataset / ClassBalancedDataset, ``datasets`` of ConcatDataset)."""
    def visit(dataset: Any, key: str) -> Iterator[tuple[str, Any]]:
        if isinstance(dataset, Mapping):
            yield key, dataset
            yield from visit(dataset.get('dataset'), f'{key}.dataset')
            for i, sub in enumerate(dataset.get('datasets') or ()):
                yield from visit(sub, f'{key}.datasets.{i}')

    for loader in _DATALOADERS:
        if isinstance(cfg.get(loader), Mapping):
            yield from visit(cfg[loader].get('dataset'), f'{loader}.dataset')


def dataset_roots(cfg: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(config key, value)`` of every ``data_root`` inside the dataloaders' datasets."""
    return [(f'{key}.data_root', d['data_root']) for key, d in _datasets(cfg) if 'data_root' in d]


def set_data_root(cfg: Config, data_root: str, old: str | None = None) -> int:
    """Point the config's dataloaders at ``data_root``; return how many datasets changed.

    Why: configs resolve ``data_root`` into each dataloader when they are parsed, so overriding
    the top-level ``data_root`` alone (``--cfg-options data_root=...``) would change nothing.
    Only datasets whose root equals ``old`` (default: the config's own ``data_root``) are
    retargeted, so a config that mixes datasets from several roots keeps the others; an
    evaluator's ``ann_file`` under ``old`` follows as well.
    """
    old = cfg.get('data_root') if old is None else old
    changed = 0
    for _, dataset in _datasets(cfg):
        if 'data_root' in dataset and (old is None or dataset['data_root'] == old):
            dataset['data_root'] = data_root
            changed += 1
    # Evaluators that read annotations (COCO-style detection metrics) resolved their path as
    # data_root + 'annotations/...' when the config was parsed: they follow too.
    if isinstance(old, str) and old:
        for key in ('val_evaluator', 'test_evaluator'):
            evaluators = cfg.get(key)
            for ev in evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]:
                ann = ev.get('ann_file') if isinstance(ev, Mapping) else None
                if isinstance(ann, str) and ann.startswith(old):
                    ev['ann_file'] = osp.join(data_root, ann[len(old):].lstrip('/'))
    cfg.data_root = data_root
    return changed


#: The dataloaders each tool reads: a ``data_root`` override must reach these.
TRAIN_LOADERS = ('train_dataloader', 'val_dataloader')
TEST_LOADERS = ('test_dataloader', )


def apply_cfg_options(cfg: Config, cfg_options: Mapping[str, Any] | None,
                      used_loaders: Sequence[str] | None = None) -> Config:
    """``--cfg-options`` as every daft-mm tool applies them: mmengine's merge, plus
    ``data_root=PATH`` rewritten into every dataloader (see :func:`set_data_root`).

    A ``data_root`` that leaves a dataloader the tool reads (``used_loaders``: train and val for
    training, test for testing) on another folder is an error naming the exact keys to add
    (evaluators' ``ann_file`` too), not a run on two folders: a config that sets its own top-level
    ``data_root`` and passes it to some of its dataloaders only (the others keep the value their
    base resolved) would otherwise train on the new folder and validate or test on the old one
    while its dumped config shows the new root. A loader the tool does not read may stay (an OOD
    test config moves its test set only; its training set is the source domain's), and so may a
    second dataset elsewhere inside a reached loader, or a key given explicitly in
    ``cfg_options``. Without ``used_loaders`` only an override that reaches no loader is refused."""
    if cfg_options:
        old_root = cfg.get('data_root')
        cfg.merge_from_dict(dict(cfg_options))
        if 'data_root' in cfg_options:
            new_root = cfg_options['data_root']
            changed = set_data_root(cfg, new_root, old=old_root)
            roots = dataset_roots(cfg)
            # a loader reached by the new root (or given a root explicitly) may keep a second
            # dataset elsewhere on purpose; a whole loader left on another folder is an error
            kept = {key.split('.')[0] for key, value in roots
                    if value == new_root or key in cfg_options}
            stale = [(key, value) for key, value in roots
                     if value != new_root and key not in cfg_options
                     and key.split('.')[0] not in kept]
            if used_loaders is not None:
                stale = [(k, v) for k, v in stale if k.split('.')[0] in used_loaders]
            elif changed:  # no tool context: only an override that reaches nothing
                stale = []
            if stale:
                reached = [key for key, value in roots if value == new_root]
                raise ValueError(_stale_roots_message(cfg, cfg_options, new_root, old_root,
                                                      reached, stale))
    return cfg


def _stale_roots_message(cfg: Config, cfg_options: Mapping[str, Any], new_root: str,
                         old_root: Any, reached: list[str], stale: list[tuple[str, Any]]) -> str:
    listed = ', '.join(f'{key}={value!r}' for key, value in stale)
    keys = [f'{key}={new_root}' for key, _ in stale]
    roots = {value for _, value in stale if isinstance(value, str) and value}
    for name in ('val_evaluator', 'test_evaluator'):  # COCO-style metrics read ann_file
        evaluators = cfg.get(name)
        many = isinstance(evaluators, (list, tuple))
        for i, ev in enumerate(evaluators if many else [evaluators]):
            ann = ev.get('ann_file') if isinstance(ev, Mapping) else None
            key = f'{name}.{i}.ann_file' if many else f'{name}.ann_file'
            for root in roots:
                if isinstance(ann, str) and ann.startswith(root) and key not in cfg_options:
                    keys.append(f'{key}={osp.join(new_root, ann[len(root):].lstrip("/"))}')
    if not reached:
        why = (f'reaches no dataloader: the config\'s own data_root ({old_root!r}) is not the '
               f'root its datasets read ({listed}); they were resolved from a base config when '
               'it was parsed')
    else:
        why = (f'reaches {", ".join(reached)} but not {listed}: the config passes its own '
               f'data_root ({old_root!r}) to some dataloaders only; the others keep the root a '
               'base config resolved')
    return (f'--cfg-options data_root={new_root} {why}. Training, the BN statistics pass, '
            'validation and testing would read different folders. Fix: add --cfg-options '
            f'{" ".join(keys)} (to keep a dataset on another folder on purpose, give its '
            'data_root key explicitly; or make the config pass data_root to every dataloader: '
            'train_dataloader = dict(dataset=dict(data_root=data_root)), and the same for val '
            '/ test)')


def _sync_bn_keys(node: Any, path: str) -> list[str]:
    """Config keys of every ``norm_cfg`` with ``type='SyncBN'`` under ``node``."""
    found = []
    if isinstance(node, Mapping):
        norm = node.get('norm_cfg')
        if isinstance(norm, Mapping) and norm.get('type') in ('SyncBN', 'MMSyncBN'):
            found.append(f'{path}.norm_cfg.type')
        for key, value in node.items():
            if key != 'norm_cfg':
                found += _sync_bn_keys(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _sync_bn_keys(value, f'{path}[{i}]')
    return found


def distributed_on_cpu(cfg: Config) -> None:
    """Make a multi-process run (``--launcher pytorch``, ``tools/dist_train.sh``) work on a
    machine without a GPU, or say every key that stops it.

    Why: mmengine wraps the model as ``MMDistributedDataParallel(device_ids=[LOCAL_RANK])``,
    which DDP rejects for a CPU module; ``device_ids=None`` (DDP then uses the module's own
    device) is set here. NCCL and SyncBN need GPUs: those keys are named in one error.
    """
    import torch
    if torch.cuda.is_available():
        return
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                                     broadcast_buffers=False,
                                     find_unused_parameters=cfg.get('find_unused_parameters',
                                                                    False))
    elif wrapper.get('type', 'MMDistributedDataParallel') in (
            'MMDistributedDataParallel', 'DistributedDataParallel'):
        wrapper['device_ids'] = None
    env = cfg.get('env_cfg') or {}
    backend = (env.get('dist_cfg') or {}).get('backend', 'nccl')
    fixes = []
    if backend == 'nccl':
        fixes.append('env_cfg.dist_cfg.backend=gloo')
    fixes += [f'{key}=BN' for key in _sync_bn_keys(cfg.get('model'), 'model')]
    if cfg.get('sync_bn'):
        fixes.append('sync_bn=None')
    if fixes:
        raise RuntimeError(
            'a multi-process run without a GPU (torch.cuda.is_available() is False) needs the '
            'gloo backend and plain BatchNorm: NCCL and SyncBN run on GPUs only. Fix: '
            '--cfg-options ' + ' '.join(fixes) + ' (model_wrapper_cfg.device_ids=None, which '
            'DDP needs for a CPU model, is set for you)')


def shipped_configs() -> str:
    """The pure-Python configs daft-mm ships, as a ``read_base`` user imports them."""
    import daft_mm.configs
    root = osp.dirname(daft_mm.configs.__file__)
    names = []
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith('.py') and name != '__init__.py':
                rel = osp.relpath(osp.join(folder, name[:-3]), root).replace(os.sep, '.')
                names.append(f'daft_mm.configs.{rel}')
    return ('Configs shipped in the package (`from <module> import *` inside `with read_base():` '
            'from any folder; relative imports are relative to the importing file): '
            + ', '.join(names))


def load_config(path: str, cfg_options: Mapping[str, Any] | None = None, *,
                work_dir: str | None = None, launcher: str = 'none',
                used_loaders: Sequence[str] | None = None) -> Config:
    """Load a config the way the upstream tools do, plus the ``data_root`` override, plus
    CPU-only multi-process runs (:func:`distributed_on_cpu`).

    ``work_dir`` priority: argument > config > ``./work_dirs/<config name>``.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path!r} does not exist; pass the path of a .py '
                                'config, e.g. configs/_tiny_/tiny_deeplabv3_cityscapes.py')
    try:
        cfg = Config.fromfile(path)
    except KeyError as exc:  # {{_base_.key}} of a key the bases no longer define
        from .settings import REMOVED_KEYS
        key = exc.args[0] if exc.args else None
        if key not in REMOVED_KEYS:
            raise
        raise ValueError(f'{path}: {key} was removed: {REMOVED_KEYS[key]}') from None
    except Exception as exc:  # mmengine's ConfigParsingError for a read_base import not found
        if 'not found!' not in str(exc) or 'read_base' not in str(exc):
            raise
        raise FileNotFoundError(f'{path}: a `with read_base():` import names no config file '
                                f'({str(exc).split(" not found!")[0]}). {shipped_configs()}'
                                ) from exc
    cfg.launcher = launcher
    apply_cfg_options(cfg, cfg_options, used_loaders)
    from .optim import complete_daft_config
    from .settings import check_daft_keys
    check_daft_keys(cfg)  # before any work: a misspelt key would silently keep its default
    complete_daft_config(cfg)  # the optimizer constructor and per-group LR floors
    if launcher != 'none':
        distributed_on_cpu(cfg)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def checkpoint_mismatch(model: Any, state_dict: Mapping[str, Any]) -> str | None:
    """What of ``model``'s weights a checkpoint's ``state_dict`` lacks or holds with another shape
    (keys as mmengine loads them: a leading ``module.`` dropped), or None when every weight fits.
    Extra keys in the checkpoint are fine (a head the test config leaves out)."""
    from .loaded import checkpoint_shapes, own_shapes
    shapes = checkpoint_shapes(state_dict)
    own = own_shapes(model)
    missing = [k for k in own if k not in shapes]
    misshaped = [f'{k} {shapes[k]} vs {own[k]}' for k in own if k in shapes and shapes[k] != own[k]]
    parts = []
    if missing:
        parts.append(f'{len(missing)} of {len(own)} weights missing ({", ".join(missing[:3])}'
                     + (' ...' if len(missing) > 3 else '') + ')')
    if misshaped:
        parts.append(f'{len(misshaped)} with another shape ({"; ".join(misshaped[:3])}'
                     + (' ...' if len(misshaped) > 3 else '') + ')')
    return ', '.join(parts) or None


def _where(dataset: Any) -> str:
    return ', '.join(f'{k}={getattr(dataset, k, None)!r}' for k in ('data_root', 'data_prefix',
                                                                     'ann_file'))


def empty_dataset_message(exc: BaseException, loader: str = '') -> str | None:
    """A clear message when ``exc`` is mmengine failing to serialise a dataset with no samples
    (numpy's bare "need at least one array to concatenate"), naming that dataset and the
    folders it looked in; None for any other error."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == '_serialize_data':
            dataset = frame.f_locals.get('self')
            return (f'{(loader + ": ") if loader else ""}{type(dataset).__name__} found no '
                    f'samples ({_where(dataset)}): the dataset is empty. Fix: point data_root '
                    '(--cfg-options data_root=...) at the data, and check the folder layout the '
                    'dataset expects (see docs/usage.md, "Data layout")')
        tb = tb.tb_next
    return None


class ValidationRuns(Hook):
    """Counts the validation runs of a training, and refuses one over an empty set when it
    starts: its metrics would be missing, and "no validation ran" would be the wrong story."""

    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self.count = 0

    def before_val_epoch(self, runner: Any) -> None:
        dataset = getattr(getattr(runner.val_loop, 'dataloader', None), 'dataset', None)
        try:
            empty = dataset is not None and len(dataset) == 0
        except TypeError:  # an iterable dataset has no length: nothing to check
            empty = False
        if empty:
            raise ValueError(f'val_dataloader.dataset: {type(dataset).__name__} holds no samples '
                             f'({_where(dataset)}): validation would score nothing. Fix: point '
                             'its data_root / ann_file at the validation images, or drop '
                             'val_dataloader / val_cfg to train without validation')
        self.count += 1


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """One line ``name: value`` per scalar metric (mIoU, mAP...), in a stable order."""
    items = []
    for key in sorted(metrics):
        value = metrics[key]
        try:
            items.append(f'{key}: {float(value):.4f}')
        except (TypeError, ValueError):
            continue  # tables, per-class lists
    return '  '.join(items)


def close_distributed() -> None:
    """Ends a successful distributed run on every rank: a barrier, then ``destroy_process_group``.

    Why: without it the gloo process group is torn down during interpreter finalisation, while
    its C++ worker threads may still run; a rank then dies with "terminate called without an
    active exception" (SIGABRT) after training succeeded, and the launcher reports a failure
    (2 of 9 two-process runs; reproduced with a bare 2-process gloo script that never destroys
    its group). The barrier keeps a fast rank from shutting down while a slow one still
    communicates. Only on success: after a failure a peer may sit in a collective, and tearing
    down would hang instead of exiting.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
