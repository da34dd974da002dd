"""The image-blind floor of a segmentation comparison: at every pixel, the class most frequent
there in the training labels, whatever the image shows. A method near it has learnt little that
transfers; on a hard shift (dusk) a fine-tuned model can fall to it. A floor, not a method: it is
a row of the table, never paired with FT nor chosen on ID-val.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

from .runs import Context

__all__ = ['class_frequency', 'prior_predictions', 'evaluate_prior']

PRIOR = 'image-blind prior'


def class_frequency(dataset_cfg: Mapping[str, Any], num_classes: int,
                    ignore_index: int = 255) -> np.ndarray:
    """``[classes, H, W]`` counts of each class at each pixel over a dataset's label maps (read
    with its own label mapping; every map at the first one's size, nearest-resized)."""
    from mmengine.registry import DATASETS
    cfg = copy.deepcopy(dict(dataset_cfg))
    cfg['pipeline'] = [dict(type='LoadAnnotations')]
    dataset = DATASETS.build(cfg)
    counts = None
    for i in range(len(dataset)):
        label = np.asarray(dataset[i]['gt_seg_map'])
        if counts is None:
            counts = np.zeros((num_classes, ) + label.shape, np.int64)
        if label.shape != counts.shape[1:]:
            label = _resize(label, counts.shape[1:])
        for c in range(num_classes):
            counts[c] += label == c
    if counts is None:
        raise ValueError('the training set holds no label map')
    return counts


def _resize(label: np.ndarray, shape: Any) -> np.ndarray:
    import cv2
    return cv2.resize(label, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def prior_predictions(frequency: np.ndarray) -> np.ndarray:
    """The class of highest frequency at each pixel."""
    return frequency.argmax(0)


def _evaluate(prediction: np.ndarray, batches: List[Any], num_classes: int,
              ignore_index: int) -> Dict[str, Any]:
    from mmseg.evaluation import IoUMetric
    from .report import counts_miou
    intersect, union = [], []
    for batch in batches:
        for sample in batch['data_samples']:
            label = sample.gt_sem_seg.data.squeeze(0)
            pred = prediction if prediction.shape == tuple(label.shape) else _resize(
                prediction.astype(np.uint8), label.shape)
            inter, uni, _, _ = IoUMetric.intersect_and_union(
                torch.from_numpy(np.ascontiguousarray(pred)).to(label), label, num_classes,
                ignore_index)
            intersect.append([int(v) for v in inter.tolist()])
            union.append([int(v) for v in uni.tolist()])
    return dict(miou=counts_miou(intersect, union),
                counts=dict(intersect=intersect, union=union))


def evaluate_prior(ctx: Context, train_dataset: Mapping[str, Any]) -> Dict[str, Any]:
    """The floor as a run of the table (seed 0): ID-val, ID test and every OOD set."""
    classes = ctx.dataset_meta.get('classes') or ()
    ignore = int(train_dataset.get('ignore_index', 255))
    prediction = prior_predictions(class_frequency(train_dataset, len(classes), ignore))
    scores, counts = {}, {}
    for name, batches in ctx.eval_sets.items():
        done = _evaluate(prediction, batches, len(classes), ignore)
        scores[name], counts[name] = done['miou'], done['counts']
    ood = {k: v for k, v in scores.items() if k != 'ID'}
    id_val = _evaluate(prediction, ctx.id_val_batches, len(classes), ignore)['miou']
    return dict(method=PRIOR, seed=0, setting={}, id_val=id_val, id=scores['ID'], ood=ood,
                ood_mean=sum(ood.values()) / len(ood), cosine=float('nan'),
                cosine_pooled=float('nan'), counts=counts)
