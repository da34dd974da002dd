"""What a DAFT run reports and leaves behind when its preparation is done: the start-up block of
the log, the per-layer statistics shift as visualizer scalars, ``daft_bn_conversion.json`` and
``converted.pth`` (the start of the run, which ``tools/analyze_distortion.py
--reference-converted`` compares against). Kept apart from ``DAFTHook``, which only decides when
things happen.
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Dict, List, Mapping

import torch
from mmengine.runner.checkpoint import weights_to_cpu
from torch import nn

from daft_mm.core import Preparation

from .optim import describe_lrs
from .plan import DAFTPlan

__all__ = ['CONVERTED_CHECKPOINT', 'startup_block', 'visualize', 'save_report', 'save_converted']

#: written to the work dir once the preparation is done
CONVERTED_CHECKPOINT = 'converted.pth'


def startup_block(plan: DAFTPlan, done: Preparation, lrs: Mapping[str, List[float]]) -> str:
    """The run's DAFT settings as one framed block, logged last before the first step: the
    start-up log holds the config dump (hundreds of lines); this is the part to read."""
    lines = [f'method {plan.method}: ' + ', '.join(
        part for part, on in (('BN conversion', plan.convert), ('zero predictors', plan.zero_init),
                              (f'head at {plan.head_lr_mult:g}x the base LR', plan.head_lr))
        if on)]
    if plan.conversion is not None:
        conv = plan.conversion
        pretrained = ', '.join(path or '(whole model)' for path, _ in conv.pretrained[:4])
        batches = ''
        if done.report is not None:
            images = done.report.layers[0].num_samples if done.report.layers else 0
            batches = (f' over {done.report.num_batches} batch(es) per rank, {images} image(s) '
                       'in all')
        lines.append(f'BN converted: {len(conv.converted)} layer(s){batches} (pretrained: '
                     f'{pretrained or "none"}; decided by {conv.decided_by}); left as '
                     f'initialised: {len(conv.left_new)}')
        lines += [f'NOTE {note}' for note in conv.notes]
    if plan.zero_init:
        lines.append(f'predictors zeroed: {", ".join(done.zeroed)}')
    if plan.head_lr:
        lines.append(f'head ({plan.head_scope}, {plan.head_lr_mult_from}): '
                     f'{", ".join(plan.head_modules)}')
    if lrs:
        lines.append(f'effective start LRs: {describe_lrs(dict(lrs))}')
    heading = f'{"=" * 30} DAFT start-up {"=" * 30}'
    return '\n'.join([heading] + [f'  {line}' for line in lines] + ['=' * len(heading)])


def visualize(runner: Any, report: Any) -> None:
    """Per converted layer, how far its statistics moved, as scalars of the runner's visualizer
    (TensorBoard, the local backend...): ``daft_bn/<layer>/mean_shift`` and ``.../std_ratio``."""
    visualizer = getattr(runner, 'visualizer', None)
    if visualizer is None or not report.layers:
        return
    scalars = {}
    for layer in report.layers:
        scalars[f'daft_bn/{layer.name}/mean_shift'] = float(layer.mean_shift)
        scalars[f'daft_bn/{layer.name}/std_ratio'] = float(layer.std_ratio)
    visualizer.add_scalars(scalars, step=runner.iter)


def save_report(runner: Any, report: Any, plan: DAFTPlan) -> None:
    """``<log_dir>/daft_bn_conversion.json``: every converted layer's shift, and the plan."""
    with open(osp.join(runner.log_dir, 'daft_bn_conversion.json'), 'w') as f:
        json.dump(dict(report.to_dict(), plan=plan.conversion.to_dict()), f, indent=1)


def save_converted(runner: Any, net: nn.Module, state: Dict[str, Any]) -> str:
    """``<work_dir>/converted.pth``: the model right after the preparation, in the stock keys."""
    path = osp.join(runner.work_dir, CONVERTED_CHECKPOINT)
    torch.save({'meta': {'daft': dict(state), 'iter': runner.iter},
                'state_dict': weights_to_cpu(net.state_dict())}, path)
    return path
