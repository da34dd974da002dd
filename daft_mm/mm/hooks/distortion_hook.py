"""DistortionHook: watch how far fine-tuning moves the backbone, at every validation.

The numbers come from :mod:`daft_mm.core.distortion`; this file only holds the OpenMMLab glue
(running a model's data preprocessor + backbone on mmengine data batches, hook timing, logging to
the visualizer backends). ``tools/analyze_distortion.py`` reuses the glue for offline analysis.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from daft_mm.core import kept_modes
from daft_mm.core.distortion import feature_similarity, relative_change

from ..plan import unwrap

__all__ = ['DistortionHook', 'backbone_inputs', 'as_feature_tuple', 'resolve_levels',
           'FeatureStats', 'compare_backbones']


# ------------------------------------------------------------------------------------- glue
def backbone_inputs(model: nn.Module, data_batch: Any, training: bool = False) -> torch.Tensor:
    """The image tensor the model's backbone sees for an mmengine data batch (dataloader output):
    what ``model.data_preprocessor`` makes of it (normalised, padded, on the model's device)."""
    data = model.data_preprocessor(data_batch, training)
    inputs = data['inputs'] if isinstance(data, Mapping) else data[0]
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f'data_preprocessor returned inputs of type {type(inputs).__name__}; the '
                        'distortion analysis needs a batched image tensor')
    return inputs


def as_feature_tuple(out: Any) -> Tuple[torch.Tensor, ...]:
    """A backbone's output as a tuple of feature maps (mmseg/mmdet backbones return tuples)."""
    if isinstance(out, torch.Tensor):
        return (out, )
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise TypeError(f'backbone returned {type(out).__name__}; expected a tensor or a tuple of them')


def resolve_levels(levels: Sequence[int], num_outputs: int) -> List[int]:
    """Negative output indices made positive, checked against the number of backbone outputs."""
    resolved = []
    for level in levels:
        idx = level + num_outputs if level < 0 else level
        if not 0 <= idx < num_outputs:
            raise ValueError(f'feature level {level} does not exist: the backbone returns '
                             f'{num_outputs} feature map(s) (valid: 0..{num_outputs - 1} or -1..'
                             f'-{num_outputs})')
        resolved.append(idx)
    return resolved


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside, every submodule's own flag restored after (some are kept eval on purpose,
    e.g. by ``norm_eval``), and no autograd."""
    with kept_modes(modules), torch.no_grad():
        for module in modules:
            module.eval()
        yield


def one_minus_cosine_edges(num_log_bins: int = 100) -> torch.Tensor:
    """Histogram edges for ``1 - cosine``: ``[0, 1e-9)`` holds exact matches, then log-spaced up
    to 2. Cosines of fine-tuned features crowd just below 1, where linear bins see nothing."""
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.logspace(-9, math.log10(2.0), num_log_bins + 1, dtype=torch.float64)])


class FeatureStats:
    """Accumulates per-image similarities of one backbone output level against a reference;
    per-pixel cosines are kept as a histogram of ``1 - cosine`` (bounded memory)."""

    def __init__(self, num_log_bins: int = 100) -> None:
        self.cosine: List[float] = []
        self.l2: List[float] = []
        self.pixel_cosine_per_image: List[float] = []
        self.edges = one_minus_cosine_edges(num_log_bins)
        self.pixel_hist = torch.zeros(len(self.edges) - 1, dtype=torch.float64)
        self.num_pixels = 0
        self._pixel_total = 0.0

    def update(self, f0: torch.Tensor, f1: torch.Tensor) -> None:
        sim = feature_similarity(f0, f1)
        self.cosine += sim.cosine.cpu().tolist()
        self.l2 += sim.l2.cpu().tolist()
        if sim.pixel_cosine is not None:
            pix = sim.pixel_cosine.flatten(1).cpu()
            self.pixel_cosine_per_image += pix.mean(dim=1).tolist()
            dist = (1.0 - pix.flatten()).clamp(0.0, 2.0)
            idx = torch.bucketize(dist, self.edges, right=True) - 1
            idx = idx.clamp(0, len(self.pixel_hist) - 1)  # 1 - cos == 2 goes in the last bin
            self.pixel_hist += torch.bincount(idx, minlength=len(self.pixel_hist)).double()
            self.num_pixels += pix.numel()
            self._pixel_total += pix.sum().item()

    def means(self) -> Dict[str, float]:
        """Mean over images (pixel cosine: mean over all pixels of all images)."""
        def mean(values: List[float]) -> float:
            return sum(values) / len(values) if values else math.nan
        out = {'cosine': mean(self.cosine), 'l2': mean(self.l2)}
        if self.num_pixels:
            # Pixel-weighted, so images of different sizes count by their area.
            out['pixel_cosine'] = self._pixel_total / self.num_pixels
        return out

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {'num_images': len(self.cosine), 'mean': self.means(),
                               'per_image': {'cosine': self.cosine, 'l2': self.l2}}
        if self.num_pixels:
            out['per_image']['pixel_cosine_mean'] = self.pixel_cosine_per_image
            out['pixel_one_minus_cosine_histogram'] = {
                'edges': self.edges.tolist(), 'num_pixels': self.num_pixels,
                'counts': [int(c) for c in self.pixel_hist.tolist()]}
        return out


def compare_backbones(model: nn.Module,
                      backbones: Mapping[str, nn.Module],
                      pairs: Sequence[Tuple[str, str]],
                      batches: Iterable[Any],
                      *,
                      max_images: Optional[int] = None,
                      levels: Sequence[int] = (-1, )
                      ) -> Tuple[Dict[Tuple[str, str], Dict[int, FeatureStats]], int]:
    """Feature similarity of backbone pairs on the same images, one pass over ``batches``.

    Args:
        model: supplies ``data_preprocessor`` (the backbones share it, as they share the config).
        backbones: name -> backbone module; each runs once per batch.
        pairs: ``(reference, compared)`` names; the reference's features are ``f0``.
        batches: mmengine data batches (e.g. a val dataloader).
        max_images: stop after this many images (the last batch is cut).
        levels: backbone output indices to compare (negative counts from the deepest).

    Returns ``({pair: {level: FeatureStats}}, number of images seen)``. Only one batch of features
    is held at a time, so full-resolution datasets fit in memory.
    """
    for ref, other in pairs:
        for name in (ref, other):
            if name not in backbones:
                raise KeyError(f'pair ({ref!r}, {other!r}) names unknown backbone {name!r}; '
                               f'known: {sorted(backbones)}')
    if max_images is not None and max_images < 1:
        raise ValueError(f'max_images must be positive, got {max_images}')
    stats: Dict[Tuple[str, str], Dict[int, FeatureStats]] = {}
    needed = sorted({name for pair in pairs for name in pair})
    seen = 0
    with eval_mode(model, *backbones.values()):
        for batch in batches:
            inputs = backbone_inputs(model, batch, training=False)
            if max_images is not None:
                inputs = inputs[:max_images - seen]
            feats = {name: as_feature_tuple(backbones[name](inputs)) for name in needed}
            resolved = resolve_levels(levels, len(next(iter(feats.values()))))
            for pair in pairs:
                per_level = stats.setdefault(pair, {idx: FeatureStats() for idx in resolved})
                for idx in resolved:
                    per_level[idx].update(feats[pair[0]][idx], feats[pair[1]][idx])
            seen += inputs.shape[0]
            if max_images is not None and seen >= max_images:
                break
    if seen == 0:
        raise ValueError('no images: the dataloader yielded nothing to compare features on')
    return stats, seen


# ------------------------------------------------------------------------------------- hook
@HOOKS.register_module()
class DistortionHook(Hook):
    """Logs, at every validation, how far the backbone has moved from where training started.

    Where training started means: after the pretrained weights were loaded and after every
    ``before_train`` hook ran (so after a ``DAFTHook``'s BN conversion, whatever the two hooks'
    priorities): the snapshot is taken at the first training iteration, or at a validation that
    runs before it. That is the like-with-like reference for DAFT (the converted model, not the
    raw pretrained one). On resume the snapshot comes back from the checkpoint.

    Logged with ``runner.visualizer.add_scalars`` (so to every vis backend: local json,
    TensorBoard, ...), keys under ``distortion/``:

    * ``cosine``, ``l2``, ``pixel_cosine``: mean similarity of backbone features to the snapshot's
      on the first ``num_images`` val images (keys get an ``out{i}/`` level when several levels);
    * ``rel_change/<quantity>`` and ``rel_change/<quantity>/<stage>``: mean relative change
      ``||theta - theta0|| / ||theta0||`` of conv weights, BN weights/biases/running stats.

    Off unless listed in ``custom_hooks``. Cost per validation, on rank 0 only: two backbone
    passes over the first ``num_images`` images of rank 0's val shard, without grad; plus one
    extra backbone copy in memory on every rank.

    Args:
        num_images: val images to compare features on (bounded so it stays cheap).
        levels: backbone output indices to compare; default the deepest.
        keep_reference_in_checkpoint: store the snapshot in checkpoints so a resumed run keeps
            measuring against the true start (adds one backbone to the checkpoint size).
        stage_pattern: regex naming a module's stage, see ``relative_change``.
    """

    priority = 'LOWEST'
    CHECKPOINT_KEY = 'distortion_reference'

    def __init__(self,
                 num_images: int = 16,
                 levels: Sequence[int] = (-1, ),
                 keep_reference_in_checkpoint: bool = True,
                 stage_pattern: str = r'(?:^|\.)(layer\d+)(?:\.|$)') -> None:
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f'num_images must be a positive int, got {num_images!r}')
        if not levels:
            raise ValueError('levels must name at least one backbone output')
        self.num_images = num_images
        self.levels = tuple(levels)
        self.keep_reference_in_checkpoint = keep_reference_in_checkpoint
        self.stage_pattern = stage_pattern
        self._reference: Optional[nn.Module] = None
        self._restored: Optional[Dict[str, torch.Tensor]] = None
        self._training = False

    @staticmethod
    def _backbone(runner) -> nn.Module:
        model = unwrap(runner.model)
        if not isinstance(getattr(model, 'backbone', None), nn.Module):
            raise AttributeError(f'DistortionHook needs a model with a .backbone; '
                                 f'{type(model).__name__} has none')
        return model.backbone

    def before_run(self, runner) -> None:
        """A DAFT config whose ``custom_hooks`` lists this hook but lost DAFTHook (a child's
        list replaces the base's) fails here, before any training: see ``require_daft_hook``."""
        from mmengine.runner import BaseLoop

        from ..settings import require_daft_hook
        if isinstance(getattr(runner, '_train_loop', None), BaseLoop):
            require_daft_hook(runner.cfg, runner.hooks)

    def before_train(self, runner) -> None:
        self._training = True
        self._backbone(runner)  # fail early, before any iteration runs

    def _ensure_reference(self, runner) -> None:
        if self._reference is not None:
            return
        backbone = self._backbone(runner)
        reference = copy.deepcopy(backbone)
        if self._restored is not None and runner.iter > 0:
            reference.load_state_dict(self._restored)
            runner.logger.info('DistortionHook: measuring against the start-of-training backbone '
                               'stored in the resumed checkpoint')
        elif runner.iter > 0:
            runner.logger.warning(
                'DistortionHook: resumed at iter %d without a stored reference; measuring '
                'against the resumed weights instead of the start of training', runner.iter)
        reference.requires_grad_(False)
        reference.eval()  # mmseg's ResNet.train() returns None: no chaining
        self._reference = reference
        self._restored = None

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        self._ensure_reference(runner)

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if not self._training:
            return  # a standalone val/test run: there is no start of training to compare with
        self._ensure_reference(runner)  # every rank: the snapshot is saved in checkpoints
        if not is_main_process():
            return  # vis backends write on rank 0 only; the other ranks need not compute
        model = unwrap(runner.model)
        backbone = self._backbone(runner)
        stats, _ = compare_backbones(model, {'ref': self._reference, 'cur': backbone},
                                     [('ref', 'cur')], runner.val_dataloader,
                                     max_images=self.num_images, levels=self.levels)
        scalars: Dict[str, float] = {}
        per_level = stats[('ref', 'cur')]
        for idx, fs in per_level.items():
            tag = 'distortion/' if len(per_level) == 1 else f'distortion/out{idx}/'
            for key, value in fs.means().items():
                scalars[tag + key] = value
        report = relative_change(self._reference.state_dict(), backbone.state_dict(),
                                 stage_pattern=self.stage_pattern)
        for quantity, value in report.quantity_means().items():
            scalars[f'distortion/rel_change/{quantity}'] = value
        for quantity, stages in report.stage_means().items():
            for stage, value in stages.items():
                scalars[f'distortion/rel_change/{quantity}/{stage}'] = value
        scalars = {k: float(v) for k, v in scalars.items() if not math.isnan(v)}
        by_epoch = getattr(runner.log_processor, 'by_epoch', False)
        runner.visualizer.add_scalars(scalars, step=runner.epoch if by_epoch else runner.iter)
        brief = ', '.join(f'{k.split("/", 1)[1]}={v:.4g}' for k, v in scalars.items()
                          if k.count('/') <= 2)
        runner.logger.info(f'DistortionHook ({len(next(iter(per_level.values())).cosine)} images, '
                           f'vs start of training): {brief}')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.keep_reference_in_checkpoint and self._reference is not None:
            checkpoint[self.CHECKPOINT_KEY] = {k: v.detach().cpu()
                                               for k, v in self._reference.state_dict().items()}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Used only if training continues from iter > 0 (a resume); a plain load_from starts anew.
        self._restored = checkpoint.get(self.CHECKPOINT_KEY)
