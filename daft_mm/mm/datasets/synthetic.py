"""Deterministic tiny datasets written in the real Cityscapes / PASCAL VOC folder layouts.

Why: tests and demos must run the *stock* ``CityscapesDataset``, ``PascalVOCDataset`` (mmseg) and
``VOCDataset`` (mmdet) classes end to end, offline and in seconds. The generators below draw
scenes out of textured shapes whose class can be told from colour, texture and position, so that a
tiny model visibly learns them in a few hundred iterations.

Determinism: every image has its own random streams, seeded from ``(seed, split, index, stream)``.
Geometry (hence labels and boxes) is drawn from a stream that no :class:`Style` setting touches,
so the same ``seed`` with two styles gives pixel-identical label maps: an in-domain / shifted-domain
pair of the same scenes (used later for ID vs OOD evaluation).

Command line (writes ``<root>/cityscapes`` and/or ``<root>/VOCdevkit``)::

    python -m daft_mm.mm.datasets data/synthetic --num-train 16 --num-val 8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

__all__ = [
    'Style', 'make_cityscapes', 'make_voc', 'write_cityscapes_instances',
    'CITYSCAPES_INSTANCE_CATEGORIES', 'CITYSCAPES_CLASSES', 'VOC_CLASSES',
    'CITYSCAPES_SCENE_CLASSES', 'VOC_DEFAULT_CLASSES', 'IGNORE_INDEX'
]

IGNORE_INDEX = 255

# Same order as mmseg's CityscapesDataset.METAINFO (train ids 0..18).
CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
                      'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
                      'truck', 'bus', 'train', 'motorcycle', 'bicycle')
_CS = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}
# Base colours (RGB) of the classes the scene generator draws; the official Cityscapes colours.
_CS_COLORS: dict[int, tuple[int, int, int]] = {
    _CS['road']: (128, 64, 128), _CS['sidewalk']: (244, 35, 232), _CS['building']: (70, 70, 70),
    _CS['pole']: (153, 153, 153), _CS['traffic sign']: (220, 220, 0),
    _CS['vegetation']: (107, 142, 35), _CS['sky']: (70, 130, 180), _CS['person']: (220, 20, 60),
    _CS['car']: (0, 0, 142)
}
#: Train ids that appear in generated Cityscapes scenes (the other ids are never drawn).
CITYSCAPES_SCENE_CLASSES = tuple(sorted(_CS_COLORS))

# Index 0 is background, as in the VOC segmentation masks (mmdet's VOCDataset has no background).
VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car',
               'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
               'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
#: Object classes ``make_voc`` draws unless told otherwise: few, so tiny runs can learn them.
VOC_DEFAULT_CLASSES = ('aeroplane', 'car', 'cat', 'person', 'tvmonitor')

_SPLIT_CODE = {'train': 1, 'val': 2}
_STREAM_LAYOUT, _STREAM_TEXTURE, _STREAM_STYLE = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Style: the photometric domain of a generated set
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Style:
    """Photometric look of generated images. Labels never depend on it.

    Attributes:
        palette: class id -> RGB base colour overriding the default colour of that class
            (Cityscapes train ids, or VOC indices with 0 = background).
        color_shift: RGB offsets added to every pixel (e.g. ``(20, 0, -20)`` for a warm cast).
        brightness: multiplicative gain (``< 1`` darker).
        contrast: gain around the image mean (``< 1`` flatter, fog-like with a bright shift).
        saturation: gain of the distance to grey (``0`` gives a grey image).
        noise_std: standard deviation of additive Gaussian pixel noise, in 0..255 units.
        blur_sigma: Gaussian blur sigma in pixels (``0`` disables).
    """
    palette: Mapping[int, tuple[int, int, int]] | None = None
    color_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        if len(tuple(self.color_shift)) != 3:
            raise ValueError(
                f'Style.color_shift must have 3 (R, G, B) values, got {self.color_shift!r}')
        for name in ('brightness', 'contrast', 'saturation', 'noise_std', 'blur_sigma'):
            if getattr(self, name) < 0:
                raise ValueError(f'Style.{name} must be >= 0, got {getattr(self, name)!r}')
        for cls, rgb in (self.palette or {}).items():
            if len(tuple(rgb)) != 3:
                raise ValueError(f'Style.palette[{cls!r}] must be an (R, G, B) triple, got {rgb!r}')

    @classmethod
    def coerce(cls, style: 'Style | Mapping[str, Any] | None') -> 'Style':
        """Accept a :class:`Style`, a dict of its fields, or ``None`` (the default look)."""
        if style is None:
            return cls()
        if isinstance(style, Style):
            return style
        if isinstance(style, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(style) - known)
            if unknown:
                raise ValueError(f'unknown style keys {unknown}; valid keys are {sorted(known)}')
            return cls(**dict(style))
        raise TypeError(f'style must be a Style, a dict or None, got {type(style).__name__}')

    def base_color(self, cls_id: int, default: Sequence[int]) -> np.ndarray:
        """The base colour of a class under this style (RGB, float32)."""
        rgb = (self.palette or {}).get(cls_id, default)
        return np.asarray(rgb, dtype=np.float32)

    def apply(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply the global photometric changes to a float32 RGB image (0..255)."""
        img = rgb.astype(np.float32, copy=True)
        if self.saturation != 1.0:
            grey = img.mean(axis=2, keepdims=True)
            img = grey + (img - grey) * self.saturation
        if self.contrast != 1.0:
            img = img.mean() + (img - img.mean()) * self.contrast
        img = img * self.brightness + np.asarray(self.color_shift, dtype=np.float32)
        if self.blur_sigma > 0:
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=float(self.blur_sigma))
        if self.noise_std > 0:
            img = img + rng.normal(0.0, self.noise_std, size=img.shape).astype(np.float32)
        return img


# --------------------------------------------------------------------------------------------
# Small drawing helpers (all on HxW arrays; colours RGB float32)
# --------------------------------------------------------------------------------------------
def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index), stream])


def _check_common(num_train: int, num_val: int, size: Sequence[int], seed: int) -> tuple[int, int]:
    for name, n in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f'{name} must be a non-negative int, got {n!r}')
    if num_train + num_val == 0:
        raise ValueError('num_train + num_val is 0: nothing to generate')
    if len(tuple(size)) != 2:
        raise ValueError(f'size must be (height, width), got {size!r}')
    h, w = (int(s) for s in size)
    if h < 32 or w < 32:
        raise ValueError(f'size must be at least (32, 32) so that shapes fit, got {(h, w)}')
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f'seed must be an int, got {seed!r}')
    return h, w


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A zero-mean HxW modulation pattern of roughly unit amplitude."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 'flat':
        return np.zeros((h, w), np.float32)
    if kind == 'noise':  # fine grain (foliage)
        return rng.standard_normal((h, w)).astype(np.float32)
    if kind == 'blotch':  # coarse, smooth noise
        small = rng.standard_normal((max(h // 6, 2), max(w // 6, 2))).astype(np.float32)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    period = float(rng.uniform(4.0, 7.0))
    phase = float(rng.uniform(0, 2 * math.pi))
    if kind == 'hstripes':
        return np.sign(np.sin(2 * math.pi * yy / period + phase)).astype(np.float32)
    if kind == 'vstripes':
        return np.sign(np.sin(2 * math.pi * xx / period + phase)).astype(np.float32)
    if kind == 'checker':
        return (np.sign(np.sin(2 * math.pi * xx / period + phase))
                * np.sign(np.sin(2 * math.pi * yy / period + phase))).astype(np.float32)
    if kind == 'dots':
        return (np.sin(2 * math.pi * xx / period + phase) * np.sin(2 * math.pi * yy / period)
                > 0.6).astype(np.float32) * 2 - 1
    if kind == 'vgradient':
        return (yy / max(h - 1, 1) - 0.5) * 2
    raise ValueError(f'unknown texture {kind!r}')


def _fill(img: np.ndarray, mask: np.ndarray, color: np.ndarray, tex: np.ndarray,
          amp: float) -> None:
    """Paint ``color`` modulated by ``tex`` (amplitude ``amp`` of full scale) where ``mask``."""
    shade = color[None, None, :] + (amp * 255.0) * tex[..., None] * 0.25
    img[mask] = shade[mask]


def _to_uint8_bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


# --------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------
_CS_TEXTURE = {  # class -> (texture kind, amplitude): the cue besides colour
    _CS['road']: ('blotch', 0.15), _CS['sidewalk']: ('checker', 0.25),
    _CS['building']: ('flat', 0.0), _CS['pole']: ('flat', 0.0),
    _CS['traffic sign']: ('flat', 0.0), _CS['vegetation']: ('noise', 0.45),
    _CS['sky']: ('vgradient', 0.3), _CS['person']: ('blotch', 0.3), _CS['car']: ('hstripes', 0.2)
}


def _cityscapes_scene(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a street-like label map: sky, skyline, trees, road, sidewalks, poles, people, cars."""
    lab = np.full((h, w), _CS['sky'], np.uint8)
    horizon = int(h * rng.uniform(0.32, 0.45))
    road_top = int(h * rng.uniform(0.55, 0.65))
    # Buildings: a skyline of blocks between the top third and the road.
    x = 0
    while x < w:
        bw = int(rng.integers(max(w // 10, 4), max(w // 4, 6)))
        top = int(rng.integers(max(h // 12, 1), horizon + 1))
        lab[top:road_top, x:x + bw] = _CS['building']
        x += bw + int(rng.integers(0, max(w // 24, 1) + 1))
    # Trees: ellipses in front of the buildings.
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(horizon - h // 8, road_top))
        ax = int(rng.integers(w // 16 + 2, w // 7 + 3))
        ay = int(rng.integers(h // 10 + 2, h // 5 + 3))
        cv2.ellipse(lab, (cx, cy), (ax, ay), 0, 0, 360, int(_CS['vegetation']), -1)
    # Ground: road as a trapezoid, sidewalks at both sides.
    lab[road_top:, :] = _CS['sidewalk']
    spread = rng.uniform(0.15, 0.35) * w
    road = np.array([[w / 2 - spread, road_top], [w / 2 + spread, road_top], [w * 1.1, h],
                     [-w * 0.1, h]], np.int32)
    cv2.fillPoly(lab, [road], int(_CS['road']))
    # Poles with signs on the sidewalk.
    for _ in range(int(rng.integers(1, 3))):
        side = rng.integers(0, 2)
        px = int(rng.uniform(0.02, 0.2) * w) if side == 0 else int(rng.uniform(0.8, 0.98) * w)
        pw = max(w // 64, 1) + 1
        ptop = int(rng.integers(h // 8, horizon))
        lab[ptop:road_top + h // 10, px:px + pw] = _CS['pole']
        if rng.random() < 0.7:
            s = max(h // 12, 3)
            lab[ptop:ptop + s, px - s // 2:px + pw + s // 2] = _CS['traffic sign']
    # People on the sidewalks.
    for _ in range(int(rng.integers(0, 3))):
        left = rng.random() < 0.5
        cx = int(rng.uniform(0.05, 0.3) * w) if left else int(rng.uniform(0.7, 0.95) * w)
        ph = int(rng.integers(h // 6, h // 4 + 1))
        cy = int(rng.integers(road_top, min(h - 2, road_top + h // 6) + 1)) - ph // 2
        cv2.ellipse(lab, (cx, cy), (max(ph // 5, 2), ph // 2), 0, 0, 360, int(_CS['person']), -1)
    # Cars on the road: wider the lower they stand.
    for _ in range(int(rng.integers(1, 4))):
        cy = int(rng.integers(road_top + h // 20, h - h // 10))
        depth = (cy - road_top) / max(h - road_top, 1)
        cw = int(w * (0.08 + 0.15 * depth))
        ch = max(int(cw * rng.uniform(0.45, 0.6)), 3)
        cx = int(rng.uniform(0.25, 0.75) * w)
        x0, y0 = cx - cw // 2, cy - ch
        lab[max(y0, 0):cy, max(x0, 0):x0 + cw] = _CS['car']
    # Ego-vehicle strip at the bottom: ignored, as in real gtFine.
    lab[h - max(h // 32, 1):, :] = IGNORE_INDEX
    return lab


def _render_cityscapes(lab: np.ndarray, style: Style, tex_rng: np.random.Generator,
                       style_rng: np.random.Generator) -> np.ndarray:
    h, w = lab.shape
    img = np.zeros((h, w, 3), np.float32)
    for cls_id, default in _CS_COLORS.items():
        mask = lab == cls_id
        kind, amp = _CS_TEXTURE[cls_id]
        # Always draw the jitter and texture so the random streams do not depend on the content.
        jitter = tex_rng.uniform(-12, 12, size=3).astype(np.float32)
        tex = _texture(kind, h, w, tex_rng)
        if not mask.any():
            continue
        color = style.base_color(cls_id, default) + jitter
        _fill(img, mask, color, tex, amp)
        if cls_id == _CS['building']:  # windows: darker grid inside building blocks
            yy, xx = np.mgrid[0:h, 0:w]
            win = ((yy // 3) % 3 == 1) & ((xx // 3) % 3 == 1) & mask
            img[win] = img[win] * 0.55
        if cls_id == _CS['road']:  # dashed lane marking, still road
            cx = w // 2
            dash = mask & (np.abs(np.arange(w)[None, :] - cx) <= max(w // 128, 0)) & \
                ((np.arange(h)[:, None] // 4) % 2 == 0)
            img[dash] = 230.0
    img[lab == IGNORE_INDEX] = np.asarray(style.base_color(IGNORE_INDEX, (20, 20, 20)))
    return style.apply(img, style_rng)


def make_cityscapes(root: str | Path, *, num_train: int, num_val: int,
                    size: Sequence[int] = (64, 128), seed: int = 0,
                    style: Style | Mapping[str, Any] | None = None,
                    cities: Mapping[str, Sequence[str]] | None = None,
                    instances: bool = False) -> Path:
    """Write a tiny Cityscapes-layout dataset under ``root`` and return ``root``.

    Layout (what mmseg's ``CityscapesDataset`` reads with ``data_root=root``)::

        leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png

    Labels are train ids 0..18 (only :data:`CITYSCAPES_SCENE_CLASSES` occur) and 255 = ignore.

    Args:
        root: output folder; existing files with the same names are overwritten.
        num_train, num_val: number of images per split.
        size: ``(height, width)`` of every image.
        seed: generation seed; same seed -> same files.
        style: a :class:`Style` (or a dict of its fields) for domain-shifted variants.
        cities: split -> city names images are spread over (round robin).
        instances: also write the COCO-format instance annotations of mmdet's Cityscapes
            configs (:func:`write_cityscapes_instances`).
    """
    h, w = _check_common(num_train, num_val, size, seed)
    style = Style.coerce(style)
    cities = dict(cities or {'train': ('aachen', 'bremen'), 'val': ('frankfurt', )})
    root = Path(root)
    for split, num in (('train', num_train), ('val', num_val)):
        names = tuple(cities.get(split, ()))
        if num and not names:
            raise ValueError(f'cities has no names for split {split!r}')
        for i in range(num):
            city = names[i % len(names)]
            stem = f'{city}_{i // len(names):06d}_000019'  # gtFine frames are 000019
            lab = _cityscapes_scene(h, w, _rng(seed, split, i, _STREAM_LAYOUT))
            img = _render_cityscapes(lab, style, _rng(seed, split, i, _STREAM_TEXTURE),
                                     _rng(seed, split, i, _STREAM_STYLE))
            img_dir = root / 'leftImg8bit' / split / city
            ann_dir = root / 'gtFine' / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            ann_dir.mkdir(parents=True, exist_ok=True)
            _write(cv2.imwrite(str(img_dir / f'{stem}_leftImg8bit.png'), _to_uint8_bgr(img)),
                   img_dir / f'{stem}_leftImg8bit.png')
            Image.fromarray(lab, mode='L').save(ann_dir / f'{stem}_gtFine_labelTrainIds.png')
    if instances:
        for split, num in (('train', num_train), ('val', num_val)):
            if num:
                write_cityscapes_instances(root, split)
    return root


#: mmdet's Cityscapes instance categories (ids of cityscapesscripts' labels, as its converter
#: writes them) and, of the generated scenes' train ids, those that are instances (person, car)
CITYSCAPES_INSTANCE_CATEGORIES = ((24, 'person'), (25, 'rider'), (26, 'car'), (27, 'truck'),
                                  (28, 'bus'), (31, 'train'), (32, 'motorcycle'), (33, 'bicycle'))
_INSTANCE_CATEGORY_OF_TRAIN_ID = {11: 24, 13: 26}


def write_cityscapes_instances(root: str | Path, split: str) -> Path:
    """``root/annotations/instancesonly_filtered_gtFine_<split>.json``: COCO-format instances in
    the form mmdet's Cityscapes converter writes (what its Cityscapes detection / instance
    configs read), one instance per connected region of a thing class in the label maps."""
    root = Path(root)
    images, annotations = [], []
    labels = sorted((root / 'gtFine' / split).rglob('*_gtFine_labelTrainIds.png'))
    if not labels:
        raise FileNotFoundError(f'no *_gtFine_labelTrainIds.png under {root / "gtFine" / split}; '
                                'write the scenes first (make_cityscapes)')
    for image_id, png in enumerate(labels):
        lab = np.array(Image.open(png))
        stem = png.name[:-len('_gtFine_labelTrainIds.png')]
        images.append(dict(id=image_id, file_name=f'{png.parent.name}/{stem}_leftImg8bit.png',
                           height=int(lab.shape[0]), width=int(lab.shape[1])))
        for train_id, category in _INSTANCE_CATEGORY_OF_TRAIN_ID.items():
            count, comp, stats, _ = cv2.connectedComponentsWithStats(
                (lab == train_id).astype(np.uint8))
            for k in range(1, count):
                x, y, w, h, area = (int(v) for v in stats[k])
                contours, _ = cv2.findContours((comp == k).astype(np.uint8), cv2.RETR_EXTERNAL,
                                               cv2.CHAIN_APPROX_SIMPLE)
                polygons = [c.flatten().tolist() for c in contours if len(c) >= 3]
                if area < 16 or not polygons:
                    continue
                annotations.append(dict(id=len(annotations) + 1, image_id=image_id,
                                        category_id=category, bbox=[x, y, w, h], area=area,
                                        segmentation=polygons, iscrowd=0))
    out = root / 'annotations' / f'instancesonly_filtered_gtFine_{split}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(images=images, annotations=annotations, categories=[
        dict(id=i, name=n) for i, n in CITYSCAPES_INSTANCE_CATEGORIES])))
    return out


# --------------------------------------------------------------------------------------------
# PASCAL VOC
# --------------------------------------------------------------------------------------------
_VOC_SHAPES = ('rect', 'ellipse', 'triangle', 'diamond')
_VOC_TEXTURES = ('flat', 'hstripes', 'vstripes', 'checker', 'dots')


def _voc_palette() -> list[int]:
    """The standard VOC colour map (bit-interleaved), as a flat 768-entry PIL palette."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _voc_look(cls_id: int) -> tuple[str, str, np.ndarray]:
    """Shape, texture and base colour of a VOC class: fixed per class, distinct across classes."""
    shape = _VOC_SHAPES[cls_id % len(_VOC_SHAPES)]
    texture = _VOC_TEXTURES[(cls_id // len(_VOC_SHAPES)) % len(_VOC_TEXTURES)]
    hue = int(180 * ((cls_id * 7) % 20) / 20)  # OpenCV hue range 0..179, spread out
    hsv = np.uint8([[[hue, 200, 210]]])
    return shape, texture, cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _voc_shape_mask(shape: str, h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros((h, w), np.uint8)
    if shape == 'rect':
        m[y0:y1 + 1, x0:x1 + 1] = 1
    elif shape == 'ellipse':
        cv2.ellipse(m, (((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0 + 1, y1 - y0 + 1), 0), 1, -1)
    elif shape == 'triangle':
        cv2.fillPoly(m, [np.array([[(x0 + x1) // 2, y0], [x1, y1], [x0, y1]], np.int32)], 1)
    else:  # diamond
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        cv2.fillPoly(m, [np.array([[cx, y0], [x1, cy], [cx, y1], [x0, cy]], np.int32)], 1)
    return m.astype(bool)


def _voc_scene(h: int, w: int, class_ids: Sequence[int], max_objects: int,
               rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Instance map (0 = background, k = k-th object) and the objects' class / placement."""
    inst = np.zeros((h, w), np.int32)
    objects = []
    for k in range(1, int(rng.integers(1, max_objects + 1)) + 1):
        cls_id = int(class_ids[int(rng.integers(0, len(class_ids)))])
        bh = int(rng.uniform(0.3, 0.65) * h)
        bw = int(np.clip(bh * rng.uniform(0.7, 1.6), 0.2 * w, 0.6 * w))
        # Allow objects to run off the image edge now and then (-> truncated).
        x0 = int(rng.integers(-bw // 5, w - bw + bw // 5 + 1))
        y0 = int(rng.integers(-bh // 5, h - bh + bh // 5 + 1))
        shape = _voc_look(cls_id)[0]
        mask = _voc_shape_mask(shape, h, w, (x0, y0, x0 + bw - 1, y0 + bh - 1))
        full_area = int(_voc_shape_mask(shape, h + 2 * h, w + 2 * w,
                                        (x0 + w, y0 + h, x0 + w + bw - 1, y0 + h + bh - 1)).sum())
        inst[mask] = k
        objects.append(dict(cls_id=cls_id, full_area=max(full_area, 1),
                            truncated=int(x0 < 0 or y0 < 0 or x0 + bw > w or y0 + bh > h)))
    return inst, objects


def _voc_void_border(inst: np.ndarray) -> np.ndarray:
    """Pixels on an object outline (VOC marks a thin 'void' band there with 255)."""
    kernel = np.ones((3, 3), np.uint8)
    border = np.zeros(inst.shape, bool)
    for k in np.unique(inst):
        if k == 0:
            continue
        m = (inst == k).astype(np.uint8)
        border |= cv2.dilate(m, kernel).astype(bool) & ~cv2.erode(m, kernel).astype(bool)
    return border


def _voc_xml(stem: str, h: int, w: int, objects: list[dict],
             year: str = '2012') -> ET.ElementTree:
    ann = ET.Element('annotation')
    ET.SubElement(ann, 'folder').text = f'VOC{year}'
    ET.SubElement(ann, 'filename').text = f'{stem}.jpg'
    src = ET.SubElement(ann, 'source')
    ET.SubElement(src, 'database').text = 'daft-mm synthetic'
    size = ET.SubElement(ann, 'size')
    ET.SubElement(size, 'width').text = str(w)
    ET.SubElement(size, 'height').text = str(h)
    ET.SubElement(size, 'depth').text = '3'
    ET.SubElement(ann, 'segmented').text = '1'
    for obj in objects:
        o = ET.SubElement(ann, 'object')
        ET.SubElement(o, 'name').text = VOC_CLASSES[obj['cls_id']]
        ET.SubElement(o, 'pose').text = 'Unspecified'
        ET.SubElement(o, 'truncated').text = str(obj['truncated'])
        ET.SubElement(o, 'difficult').text = str(obj['difficult'])
        bb = ET.SubElement(o, 'bndbox')
        for key, val in zip(('xmin', 'ymin', 'xmax', 'ymax'), obj['bbox']):
            ET.SubElement(bb, key).text = str(val)
    ET.indent(ann)
    return ET.ElementTree(ann)


def make_voc(root: str | Path, *, num_train: int, num_val: int, size: Sequence[int] = (96, 128),
             seed: int = 0, style: Style | Mapping[str, Any] | None = None,
             classes: Sequence[str] = VOC_DEFAULT_CLASSES, max_objects: int = 3,
             difficult_visible_fraction: float = 0.35, year: str = '2012') -> Path:
    """Write a tiny PASCAL VOC-layout dataset under ``root`` and return ``root``.

    Layout (``root/VOCdevkit/VOC<year>``; the VOC0712 detection configs read VOC2007 and
    VOC2012)::

        JPEGImages/<id>.jpg                  images
        SegmentationClass/<id>.png           palette PNG, 0 = background, 1..20 classes, 255 void
        SegmentationClassAug/<id>.png        the train labels again, as plain grayscale PNGs (the
                                             layout mmseg's voc_aug converter writes for SBD)
        ImageSets/Segmentation/aug.txt       the train ids: what the VOC-aug configs
                                             (pascal_voc12_aug.py, daft_deeplabv3_voc.py) read
        Annotations/<id>.xml                 boxes of the same objects (size, truncated, difficult)
        ImageSets/Segmentation/{train,val}.txt
        ImageSets/Main/{trainval,test}.txt   trainval = the train ids, test = the val ids

    mmseg's ``PascalVOCDataset`` reads it with ``data_root=root/VOCdevkit/VOC2012``; mmdet's
    ``VOCDataset`` with ``data_root=root/VOCdevkit`` and
    ``data_prefix=dict(sub_data_root='VOC2012/')``.

    Args:
        classes: VOC object class names to draw (each has its own shape, texture and colour).
        max_objects: at most this many objects per image (at least one).
        year: ``'2012'`` or ``'2007'``: the folder, the image ids' prefix and a different scene
            stream (the two years hold different images).
        difficult_visible_fraction: an object whose visible area is below this fraction of its
            full area (occluded or cut by the border) is written with ``<difficult>1``.
        Others: as in :func:`make_cityscapes`.
    """
    h, w = _check_common(num_train, num_val, size, seed)
    style = Style.coerce(style)
    unknown = [c for c in classes if c not in VOC_CLASSES[1:]]
    if unknown or not classes:
        raise ValueError(f'classes must be a non-empty subset of the 20 VOC object classes; '
                         f'unknown: {unknown}')
    if max_objects < 1:
        raise ValueError(f'max_objects must be >= 1, got {max_objects}')
    class_ids = [VOC_CLASSES.index(c) for c in classes]
    if year not in ('2007', '2012'):
        raise ValueError(f"year must be '2007' or '2012', got {year!r}")
    base = Path(root) / 'VOCdevkit' / f'VOC{year}'
    seed = seed if year == '2012' else seed + 2007
    dirs = {k: base / k for k in ('JPEGImages', 'SegmentationClass', 'SegmentationClassAug',
                                   'Annotations', 'ImageSets/Segmentation', 'ImageSets/Main')}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    palette = _voc_palette()
    ids: dict[str, list[str]] = {}
    for split, num in (('train', num_train), ('val', num_val)):
        ids[split] = []
        for i in range(num):
            stem = f'{year}_{_SPLIT_CODE[split]}{i:05d}'
            inst, objects = _voc_scene(h, w, class_ids, max_objects,
                                       _rng(seed, split, i, _STREAM_LAYOUT))
            tex_rng = _rng(seed, split, i, _STREAM_TEXTURE)
            # Background: low-saturation colour with a smooth blotchy texture.
            bg = np.full((h, w, 3), 0, np.float32)
            bg_color = style.base_color(0, tex_rng.uniform(90, 160, size=3))
            _fill(bg, np.ones((h, w), bool), bg_color, _texture('blotch', h, w, tex_rng), 0.35)
            img = bg
            sem = np.zeros((h, w), np.uint8)
            kept = []
            for k, obj in enumerate(objects, start=1):
                shape, texture, default = _voc_look(obj['cls_id'])
                jitter = tex_rng.uniform(-15, 15, size=3).astype(np.float32)
                tex = _texture(texture, h, w, tex_rng)
                mask = inst == k
                if not mask.any():  # fully hidden behind later objects: not in any annotation
                    continue
                _fill(img, mask, style.base_color(obj['cls_id'], default) + jitter, tex, 0.35)
                sem[mask] = obj['cls_id']
                ys, xs = np.nonzero(mask)
                obj['bbox'] = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1,
                               int(ys.max()) + 1)  # VOC boxes are 1-based, inclusive
                obj['difficult'] = int(mask.sum() / obj['full_area'] < difficult_visible_fraction)
                kept.append(obj)
            sem[_voc_void_border(inst)] = IGNORE_INDEX
            img = style.apply(img, _rng(seed, split, i, _STREAM_STYLE))
            _write(cv2.imwrite(str(dirs['JPEGImages'] / f'{stem}.jpg'), _to_uint8_bgr(img),
                               [cv2.IMWRITE_JPEG_QUALITY, 95]), dirs['JPEGImages'] / f'{stem}.jpg')
            png = Image.fromarray(sem, mode='P')
            png.putpalette(palette)
            png.save(dirs['SegmentationClass'] / f'{stem}.png')
            if split == 'train':
                Image.fromarray(sem, mode='L').save(dirs['SegmentationClassAug'] / f'{stem}.png')
            _voc_xml(stem, h, w, kept, year).write(dirs['Annotations'] / f'{stem}.xml')
            ids[split].append(stem)
    for name, split in (('ImageSets/Segmentation/train.txt', 'train'),
                        ('ImageSets/Segmentation/val.txt', 'val'),
                        ('ImageSets/Segmentation/aug.txt', 'train'),
                        ('ImageSets/Main/trainval.txt', 'train'),
                        ('ImageSets/Main/test.txt', 'val')):
        (base / name).write_text(''.join(f'{s}\n' for s in ids[split]))
    return Path(root)


def _write(ok: bool, path: Path) -> None:
    if not ok:
        raise OSError(f'OpenCV could not write {path}; check the folder is writable')


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: generate one or both datasets under a root folder."""
    p = argparse.ArgumentParser(prog='python -m daft_mm.mm.datasets',
                                description='Write tiny synthetic Cityscapes / VOC datasets.')
    p.add_argument('root', help='output folder; gets cityscapes/ and/or VOCdevkit/')
    p.add_argument('--which', choices=['cityscapes', 'voc', 'both'], default='both')
    p.add_argument('--num-train', type=int, default=16)
    p.add_argument('--num-val', type=int, default=8)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    root = Path(args.root)
    if args.which in ('cityscapes', 'both'):
        out = make_cityscapes(root / 'cityscapes', num_train=args.num_train,
                              num_val=args.num_val, seed=args.seed, instances=True)
        print(f'cityscapes layout (segmentation, and annotations/ for detection): {out}')
    if args.which in ('voc', 'both'):
        for year in ('2012', '2007'):  # VOC0712 detection configs read both
            make_voc(root, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                     year=year)
        print(f'VOC layout (VOC2012 and VOC2007): {root / "VOCdevkit"}')
