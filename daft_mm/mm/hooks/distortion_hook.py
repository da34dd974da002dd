"""DistortionHook: watch how far fine-tuning moves the backbone, at every validation.

The numbers come from :mod:`daft_mm.core.distortion` through the statistics of
:mod:`daft_mm.mm.distortion` (which the offline analysis uses too); this file only decides when
they are measured and logs them to the visualizer backends.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional, Sequence

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from daft_mm.core.distortion import relative_change

from ..distortion import compare_backbones
from ..plan import unwrap

__all__ = ['DistortionHook']


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
