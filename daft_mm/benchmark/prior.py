"""The image-blind floor of a comparison: what the training labels alone predict, whatever the
image shows. Segmentation: at every pixel, the class most frequent there. Detection: the same
boxes on every image, the training set's most typical ones (k-means of each class's boxes in
image-relative corners, as many per class as its share of the training boxes, 100 in all, the
COCO metric's detections per image), each scored by how often such a box occurs per training
image. A method near the floor has learnt little that transfers; on a hard shift (dusk, fog) a
fine-tuned model can fall to it. A floor, not a method: it is a row of the table, never paired
with FT nor chosen on ID-val.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from .runs import Context, set_score

__all__ = ['class_frequency', 'prior_predictions', 'BoxPrior', 'box_prior', 'ImageBlindDetector',
           'evaluate_prior']

PRIOR = 'image-blind prior'
#: boxes the detection floor puts on every image: the most COCO's bbox mAP counts per image
PRIOR_BOXES = 100


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


@dataclass
class BoxPrior:
    """Boxes as fractions of the image (``[K, 4]`` x1, y1, x2, y2), their classes and scores."""
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


def _every_image(dataset_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The dataset config without its pipeline and its filter (images without boxes count)."""
    cfg = copy.deepcopy(dict(dataset_cfg))
    if 'dataset' in cfg:
        cfg['dataset'] = _every_image(cfg['dataset'])
    elif 'datasets' in cfg:
        cfg['datasets'] = [_every_image(d) for d in cfg['datasets']]
    else:
        cfg['pipeline'] = []
        cfg.pop('filter_cfg', None)
    return cfg


def _training_boxes(dataset_cfg: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray, int]:
    """Every training box as image fractions, its class, and the number of training images (the
    dataset's own annotation parsing: COCO json, VOC xml; no image is read)."""
    from mmengine.registry import DATASETS
    dataset = DATASETS.build(_every_image(dataset_cfg))
    boxes, labels = [], []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        w, h = float(info['width']), float(info['height'])
        for inst in info.get('instances', ()):
            if inst.get('ignore_flag', 0):
                continue
            x1, y1, x2, y2 = inst['bbox']
            boxes.append((x1 / w, y1 / h, x2 / w, y2 / h))
            labels.append(int(inst['bbox_label']))
    return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels, np.int64), len(dataset)


def box_prior(boxes: np.ndarray, labels: np.ndarray, images: int,
              total: int = PRIOR_BOXES) -> BoxPrior:
    """The detection floor from the training boxes (image fractions): each class gets its share
    of ``total`` (at least one, at most its number of distinct boxes), its boxes' k-means
    centres, each scored by its cluster's boxes per training image."""
    if not len(boxes):
        raise ValueError('the training set holds no box: a detection floor needs some')
    classes, counts = np.unique(labels, return_counts=True)
    share = total * counts / counts.sum()
    k = np.maximum(1, np.floor(share)).astype(int)
    for i in np.argsort(-(share - np.floor(share)), kind='stable')[:max(0, total - k.sum())]:
        k[i] += 1
    out_boxes, out_labels, out_scores = [], [], []
    for c, kc in zip(classes, k):
        mine = boxes[labels == c]
        kc = min(int(kc), len(np.unique(mine, axis=0)))
        # k-means++ from a fixed seed: the floor is the same on every machine
        _, assign = kmeans2(mine, kc, iter=50, minit='++', seed=0)
        for j in range(kc):
            members = mine[assign == j]
            if len(members):
                out_boxes.append(members.mean(0))
                out_labels.append(int(c))
                out_scores.append(len(members) / max(images, 1))
    return BoxPrior(np.asarray(out_boxes), np.asarray(out_labels), np.asarray(out_scores))


class ImageBlindDetector:
    """A "model" that ignores its images: every image gets the prior's boxes, scaled to its
    original size, as mmdet's ``test_step`` would return them to the metric."""

    def __init__(self, prior: BoxPrior) -> None:
        self.prior = prior

    def eval(self) -> 'ImageBlindDetector':
        return self

    def test_step(self, batch: Mapping[str, Any]) -> List[Any]:
        from mmengine.structures import InstanceData
        out = []
        for sample in batch['data_samples']:
            h, w = sample.metainfo['ori_shape'][:2]
            result = sample.clone()
            result.pred_instances = InstanceData(
                bboxes=torch.as_tensor(self.prior.boxes * [w, h, w, h], dtype=torch.float32),
                scores=torch.as_tensor(self.prior.scores, dtype=torch.float32),
                labels=torch.as_tensor(self.prior.labels, dtype=torch.int64))
            out.append(result)
        return out


def _bbox_metric_only(evaluator: Any) -> List[Dict[str, Any]]:
    """The config's metrics on boxes alone (Mask R-CNN's CocoMetric also scores masks, which a
    box prior has none of)."""
    cfgs = copy.deepcopy(evaluator)
    cfgs = [cfgs] if isinstance(cfgs, Mapping) else list(cfgs or ())
    for cfg in cfgs:
        if 'CocoMetric' in str(cfg.get('type')):
            cfg['metric'] = 'bbox'
    return cfgs


def _evaluate_detection_prior(ctx: Context, train_dataset: Mapping[str, Any]
                              ) -> Dict[str, float]:
    boxes, labels, images = _training_boxes(train_dataset)
    model = ImageBlindDetector(box_prior(boxes, labels, images))
    evaluator = _bbox_metric_only(ctx.evaluator)
    return {name: set_score(model, ctx, name, evaluator)[0]
            for name in ['id_val'] + list(ctx.eval_sets)}


def evaluate_prior(ctx: Context, train_dataset: Mapping[str, Any]) -> Dict[str, Any]:
    """The floor as a run of the table (seed 0): ID-val, ID test and every OOD set."""
    if ctx.task.kind == 'det':
        scores = _evaluate_detection_prior(ctx, train_dataset)
        ood = {k: v for k, v in scores.items() if k not in ('ID', 'id_val')}
        return dict(method=PRIOR, seed=0, setting={}, id_val=scores['id_val'],
                    id=scores['ID'], ood=ood, ood_mean=sum(ood.values()) / len(ood),
                    cosine=float('nan'), cosine_pooled=float('nan'))
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
