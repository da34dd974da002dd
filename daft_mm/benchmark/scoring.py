"""What a comparison scores a model with: the metric its users already report.

Segmentation: mmseg's ``IoUMetric`` (mIoU), with each image's per-class pixel counts, from which
per-class IoU and a bootstrap over images are computed. Detection: the config's own mmdet
metric (``test_evaluator``: ``CocoMetric`` bbox mAP, mask mAP for Mask R-CNN as an extra score,
or ``VOCMetric`` mAP), given each set's own annotation file. A COCO mAP is not a sum over images,
so a detection score has no per-image counts: its intervals are over seeds only.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os.path as osp
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ['SCOPES', 'METRIC_NAMES', 'segmentation_score', 'detection_score', 'score']

#: a task's kind (``daft_mm.mm.cli.detect_task``) -> the default scope its runs are built in
SCOPES = {'seg': 'mmseg', 'det': 'mmdet'}
#: kind -> the name of the score in tables and plots
METRIC_NAMES = {'seg': 'mIoU', 'det': 'bbox mAP'}

Counts = Dict[str, List[List[int]]]


def _predict(model: Any, batches: List[Any], evaluator: Any) -> None:
    import torch
    model.eval()
    with torch.no_grad():
        for batch in batches:
            evaluator.process(data_samples=model.test_step(batch), data_batch=batch)


def _images(batches: List[Any]) -> int:
    return sum(len(batch['inputs']) for batch in batches)


def segmentation_score(model: Any, batches: List[Any], dataset_meta: Mapping[str, Any]
                       ) -> Tuple[float, Counts]:
    """mIoU (%) with mmseg's IoUMetric, and each image's per-class pixel counts
    (``{'intersect': [[...] per image], 'union': [...]}``, in the set's order)."""
    from mmengine.evaluator import Evaluator
    from mmseg.evaluation import IoUMetric
    metric = IoUMetric(iou_metrics=['mIoU'])
    evaluator = Evaluator([metric])
    evaluator.dataset_meta = dict(dataset_meta)
    _predict(model, batches, evaluator)
    counts = {'intersect': [[int(v) for v in r[0].tolist()] for r in metric.results],
              'union': [[int(v) for v in r[1].tolist()] for r in metric.results]}
    return float(evaluator.evaluate(_images(batches))['mIoU']), counts


def _annotation_file(dataset: Mapping[str, Any]) -> Optional[str]:
    """A COCO-style set's annotation file, as its dataset reads it (``data_root`` joined)."""
    while 'dataset' in dataset:  # a wrapper
        dataset = dataset['dataset']
    ann = dataset.get('ann_file')
    if not ann or not str(ann).endswith('.json'):
        return None
    root = dataset.get('data_root') or ''
    return ann if osp.isabs(ann) or not root else osp.join(root, ann)


def detection_score(model: Any, batches: List[Any], dataset_meta: Mapping[str, Any],
                    evaluator_cfg: Any, dataset: Mapping[str, Any]
                    ) -> Tuple[float, Dict[str, float]]:
    """bbox mAP (%) with the config's own mmdet metric on one set, and every mAP it reports
    (``{'bbox': ..., 'segm': ...}``, %). A ``CocoMetric`` reads the set's own annotation file:
    the config names its test set's, and ID-val or an OOD set is another."""
    from mmengine.evaluator import Evaluator
    cfgs = copy.deepcopy(evaluator_cfg)
    cfgs = [cfgs] if isinstance(cfgs, Mapping) else list(cfgs)
    for cfg in cfgs:
        if 'CocoMetric' in str(cfg.get('type')):
            ann = _annotation_file(dataset)
            cfg.update(ann_file=ann, format_only=False, outfile_prefix=None)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it loads, scores
        evaluator = Evaluator(cfgs)
        evaluator.dataset_meta = dict(dataset_meta)
        _predict(model, batches, evaluator)
        results = evaluator.evaluate(_images(batches))
    maps = {}
    for key, value in results.items():
        name = key.split('/')[-1]
        if name in ('bbox_mAP', 'segm_mAP'):
            maps[name[:4]] = 100.0 * float(value)
        elif name == 'mAP':  # VOCMetric
            maps['bbox'] = 100.0 * float(value)
    # mmdet's CocoMetric logs an error and reports nothing when no box scores above the
    # threshold: no detection is a score of 0, not a missing one
    return maps.get('bbox', 0.0), maps


def score(model: Any, batches: List[Any], dataset_meta: Mapping[str, Any], *, kind: str,
          evaluator_cfg: Any = None, dataset: Optional[Mapping[str, Any]] = None
          ) -> Tuple[float, Optional[Counts], Dict[str, float]]:
    """``(score, per-image counts or None, extra scores)`` of ``model`` on cached batches of one
    set, with the metric of the task's ``kind`` (:data:`METRIC_NAMES`)."""
    if kind == 'seg':
        value, counts = segmentation_score(model, batches, dataset_meta)
        return value, counts, {}
    if kind == 'det':
        if evaluator_cfg is None:
            raise ValueError('a detection comparison scores with the config\'s test_evaluator; '
                             'the config has none. Fix: set test_evaluator (e.g. '
                             "dict(type='CocoMetric', metric='bbox'))")
        value, maps = detection_score(model, batches, dataset_meta, evaluator_cfg,
                                      dataset or {})
        return value, None, {k: v for k, v in maps.items() if k != 'bbox'}
    raise ValueError(f'unknown task kind {kind!r}: one of {sorted(SCOPES)}')
