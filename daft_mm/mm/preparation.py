"""The statistics pass over an mmengine model, as functions a user can call without a Runner:
its forward (:func:`mm_forward`), a finite one-pass loader, the batch count, errors that name the
files of a bad batch, and the start-up checks that BatchNorm will train.

Why here and not in the hook: mmpretrain's ``PreciseBNHook`` is a free function plus a hook that
only decides when to call it. The preparation itself is :func:`daft_mm.core.prepare`, fed by
these; ``DAFTHook`` calls it once, before the first step.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

from mmengine.dataset import DefaultSampler, InfiniteSampler
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from torch.utils.data import Dataset as TorchDataset

from daft_mm.core import is_batchnorm, kept_modes

__all__ = ['mm_forward', 'one_pass_loader', 'count_batches', 'statistics_loader',
           'naming_files', 'bad_samples',
           'norm_eval_modules', 'frozen_batchnorms', 'require_bn_train']


# ------------------------------------------------------------------------ the statistics pass
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


def unrepeated(dataset: Any) -> Any:
    """The dataset with each underlying sample once: ``RepeatDataset`` (``times`` copies) and
    ``ClassBalancedDataset`` (rare classes repeated) unwrapped, also inside a
    ``ConcatDataset``. Training repeats samples to lengthen an epoch or rebalance classes; the
    statistics pass measures the data's own mean and variance, and a repeat only costs time (8
    passes for the stock Cityscapes detection configs)."""
    inner = getattr(dataset, 'dataset', None)
    if inner is not None and (hasattr(dataset, 'times') or hasattr(dataset, 'repeat_thr')):
        return unrepeated(inner)
    parts = getattr(dataset, 'datasets', None)
    if isinstance(parts, (list, tuple)) and parts:
        flat = [unrepeated(part) for part in parts]
        if any(a is not b for a, b in zip(flat, parts)):
            return ConcatDataset(flat)
    return dataset


def sample_files(dataset: Any, index: int) -> List[str]:
    """The image / annotation files of sample ``index`` as far as the dataset says (mmengine
    datasets and wrappers: ``get_data_info``; torch's ``ConcatDataset``: the part it falls in)."""
    parts = getattr(dataset, 'cumulative_sizes', None)
    if parts is not None and getattr(dataset, 'datasets', None):
        part = bisect.bisect_right(parts, index)
        return sample_files(dataset.datasets[part], index - (parts[part - 1] if part else 0))
    try:
        info = dataset.get_data_info(index)
    except Exception:  # noqa: BLE001 - no info is no reason to hide the first error
        return []
    return [str(info[k]) for k in ('img_path', 'seg_map_path', 'ann_path')
            if isinstance(info, dict) and info.get(k)]


class _NamedSamples(TorchDataset):
    """A dataset whose loading errors name the sample's files: OpenCV's error for an empty or
    unreadable image (``!buf.empty()``) does not say which of thousands it was."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as exc:
            files = sample_files(self.dataset, index) or [f'sample {index}']
            raise RuntimeError(f'could not load {", ".join(files)}: {exc}') from exc


def one_pass_loader(train: DataLoader, seed: Optional[int] = None) -> DataLoader:
    """A finite loader over a training loader's dataset, pipeline and batch size: the loader of
    DAFT's statistics pass (DAFTHook, ``tools/analyze_distortion.py --convert``).

    Why not the training loader itself: its ``InfiniteSampler`` never ends and, with persistent
    workers, iterating it would reset the iterator the training loop already holds. mmdet trains
    with a batch sampler (``AspectRatioBatchSampler``): the loader's own ``batch_size`` is None
    then, and the sampler's is the one that counts. A repeated training set is read once
    (:func:`unrepeated`).
    """
    dataset = _NamedSamples(unrepeated(train.dataset))
    batch_size = train.batch_size or getattr(train.batch_sampler, 'batch_size', None) or 1
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=train.num_workers,
        sampler=DefaultSampler(dataset, shuffle=True, seed=seed, round_up=False),
        collate_fn=train.collate_fn, worker_init_fn=train.worker_init_fn,
        persistent_workers=False)


def count_batches(loader: Any, num_batches: Optional[int] = None) -> int:
    """Batches this rank runs: one pass over the data (shared by the ranks when the loader's
    sampler is infinite), at most ``num_batches``."""
    _, world_size = get_dist_info()
    sampler = getattr(loader, 'sampler', None)
    batch_sampler = getattr(loader, 'batch_sampler', None)
    infinite = isinstance(sampler, InfiniteSampler) or isinstance(
        getattr(batch_sampler, 'sampler', None), InfiniteSampler)
    if infinite:
        batch_size = loader.batch_size or getattr(batch_sampler, 'batch_size', 1)
        one_pass = math.ceil(len(loader.dataset) / (batch_size * world_size))
    else:
        one_pass = len(loader)
    return min(one_pass, num_batches) if num_batches else one_pass


def statistics_loader(runner: Any, dataloader: Any = None, num_batches: Optional[int] = None
                      ) -> Tuple[Any, int]:
    """The loader of a Runner's statistics pass and the batches this rank runs: ``dataloader``
    (a config or a loader), default the training set in one finite pass. A rank without a batch
    still joins the pooling (the core sums whatever each rank saw)."""
    if dataloader is None:
        loader = one_pass_loader(runner.train_dataloader, runner.seed)
    elif isinstance(dataloader, dict):
        loader = runner.build_dataloader(dataloader, seed=runner.seed)
    else:
        loader = dataloader
    total = count_batches(loader, num_batches)
    if total < 1 and len(loader.dataset) == 0:
        raise ValueError(
            'DAFTHook: the dataset of the statistics pass is empty (0 samples): check data_root '
            "and the dataset's data_prefix / ann_file (or custom_hooks[DAFTHook].dataloader); "
            'DAFT measures BN statistics on target images')
    return loader, total


def batch_files(data_batch: Any) -> List[str]:
    """The image / annotation files of an mmengine data batch, as far as its samples say."""
    samples = data_batch.get('data_samples', []) if isinstance(data_batch, dict) else []
    files = []
    for sample in samples or []:
        meta = getattr(sample, 'metainfo', {}) or {}
        files += [str(meta[k]) for k in ('img_path', 'seg_map_path') if meta.get(k)]
    return files


def bad_samples(model: nn.Module, data_batch: Any) -> List[str]:
    """Segmentation samples of a batch whose label map cannot be right, each named by its file:
    a label map of another size than its image (the pipeline then crops and pads the two apart
    and training runs on misaligned labels without an error), or label ids outside
    ``[0, num_classes)`` that are not the ``ignore_index`` (the loss fails on them, naming no
    file)."""
    if not isinstance(data_batch, dict):
        return []
    samples = data_batch.get('data_samples') or []
    inputs = data_batch.get('inputs')
    head = getattr(model, 'decode_head', None)
    num_classes = getattr(head, 'num_classes', None)
    ignore = getattr(head, 'ignore_index', 255)
    found = []
    for i, sample in enumerate(samples):
        seg = getattr(sample, 'gt_sem_seg', None)
        data = getattr(seg, 'data', None)
        if data is None:
            continue
        meta = getattr(sample, 'metainfo', {}) or {}
        where = meta.get('seg_map_path') or meta.get('img_path') or f'sample {i}'
        image = inputs[i] if isinstance(inputs, (list, tuple)) and i < len(inputs) else None
        if image is not None and tuple(image.shape[-2:]) != tuple(data.shape[-2:]):
            found.append(f'{where}: the label map does not match its image '
                         f'({meta.get("img_path", "?")}): after the pipeline the image is '
                         f'{tuple(image.shape[-2:])} and the label {tuple(data.shape[-2:])}, so '
                         'the two files have different sizes')
        if isinstance(num_classes, int):
            bad = data[(data >= num_classes) & (data != ignore)]
            if bad.numel():
                ids = sorted(set(int(v) for v in bad.unique()[:8]))
                found.append(f'{where}: label ids {ids} are outside [0, {num_classes}) and not '
                             f'the ignore_index {ignore} (label conversion? reduce_zero_label?)')
    return found


def naming_files(forward: Any) -> Any:
    """``forward`` that checks each segmentation sample's label map first (:func:`bad_samples`)
    and whose errors name the files of the failing batch: a bad annotation otherwise fails deep
    in the statistics pass naming nothing, or, for a label of another size, not at all."""
    def run(model: nn.Module, data_batch: Any) -> Any:
        found = bad_samples(model, data_batch)
        if found:
            raise ValueError('bad annotation(s) in the training data: ' + '; '.join(found))
        try:
            return forward(model, data_batch)
        except Exception as exc:
            files = batch_files(data_batch)
            if not files:
                raise
            raise RuntimeError(f'{type(exc).__name__}: {exc} -- in the batch of '
                               f'{", ".join(files)}') from exc
    return run


# ---------------------------------------------------------------- does BatchNorm train at all?
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
        print_log(f'{who}: frozen_stages=0 keeps the stem frozen; these BatchNorm layers stay in '
                  f'eval mode with their statistics and affine parameters fixed: {kept}',
                  logger='current')
    return kept
