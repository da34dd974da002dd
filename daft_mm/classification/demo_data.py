"""Small generated image-folder datasets with a domain shift, for demos and tests.

The class is the shape (circle, square, triangle, cross, ...); the domain is the style.
ID images are flat-coloured shapes on a dark plain background; each OOD set keeps the
shapes and changes the style (a striped, bright background; a noisy texture), so ID
and OOD accuracy can differ the way DAFT is meant to be measured, in seconds on a CPU.

:data:`SOURCE_SHAPES` are further classes that no target task uses: a backbone pretrained on
them has seen the styles but never the target's label space, the premise of fine-tuning
(:mod:`daft_mm.benchmark.classification`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['SHAPES', 'SOURCE_SHAPES', 'STYLES', 'OOD_STYLES', 'generate_demo_datasets',
           'render_images']

SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond')
#: Shapes for a source (pretraining) task only; disjoint from :data:`SHAPES`.
SOURCE_SHAPES = ('pentagon', 'hexagon', 'star', 'ring')
OOD_STYLES = ('stripes', 'noise')
STYLES = ('id',) + OOD_STYLES
_CORNERS = {'square': 4, 'triangle': 3, 'diamond': 4, 'pentagon': 5, 'hexagon': 6}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = _CORNERS[shape]
    offset = angle + (math.pi / 4 if shape == 'square' else 0.0)
    return [(cx + r * math.cos(offset + 2 * math.pi * k / corners),
             cy + r * math.sin(offset + 2 * math.pi * k / corners)) for k in range(corners)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, size: int, rng: np.random.Generator,
                colour: tuple[int, int, int]) -> None:
    r = size * rng.uniform(0.22, 0.32)
    cx, cy = rng.uniform(r, size - r, 2)
    if shape == 'circle':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == 'cross':
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif shape == 'ring':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour,
                     width=max(1, round(r * 0.35)))
    elif shape == 'star':
        angle = rng.uniform(-0.3, 0.3)
        draw.polygon([(cx + rk * math.cos(angle + math.pi * k / 5),
                       cy + rk * math.sin(angle + math.pi * k / 5))
                      for k, rk in enumerate([r, 0.45 * r] * 5)], fill=colour)
    elif shape in _CORNERS:
        angle = rng.uniform(-0.3, 0.3) if shape != 'diamond' else 0.0
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=colour)
    else:
        raise ValueError(f'unknown shape {shape!r}')


def _render(shape: str, style: str, size: int, rng: np.random.Generator) -> Image.Image:
    if style == 'id':
        background = np.full((size, size, 3), rng.integers(10, 60), dtype=np.uint8)
        colour = tuple(int(c) for c in rng.integers(150, 256, 3))
    elif style == 'stripes':
        period = int(rng.integers(3, 7))
        stripes = (np.arange(size) // period) % 2
        background = np.where(stripes[None, :, None] == 1, 230, 170) * np.ones((size, 1, 3))
        colour = tuple(int(c) for c in rng.integers(0, 110, 3))
    elif style == 'noise':
        background = rng.integers(0, 256, (size, size, 3))
        colour = tuple(int(c) for c in rng.integers(100, 200, 3))
    else:
        raise ValueError(f'unknown style {style!r}; choose id or one of {OOD_STYLES}')
    image = Image.fromarray(np.asarray(background, dtype=np.uint8), 'RGB')
    _draw_shape(ImageDraw.Draw(image), shape, size, rng, colour)
    return image


def generate_demo_datasets(root: str | os.PathLike, *, num_classes: int = 3,
                           train_per_class: int = 16, test_per_class: int = 8,
                           image_size: int = 32, seed: int = 0) -> dict[str, Path]:
    """Write ``root/{train,test}`` (ID) and ``root/ood_<style>`` folders; return them by name.

    Deterministic for a given ``seed``.
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f'num_classes must be in [2, {len(SHAPES)}], got {num_classes}')
    rng = np.random.default_rng(seed)
    root = Path(root)
    splits = {'train': ('id', train_per_class), 'test': ('id', test_per_class)}
    splits.update({f'ood_{style}': (style, test_per_class) for style in OOD_STYLES})
    written = {}
    for split, (style, per_class) in splits.items():
        for shape in SHAPES[:num_classes]:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                _render(shape, style, image_size, rng).save(folder / f'{index:04d}.png')
        written[split] = root / split
    return written


def render_images(shapes: Sequence[str], style: str, per_class: int, *, image_size: int = 32,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, H, W, 3], labels int64 [N])`` in memory, label = index in ``shapes``.

    For experiments that train many small runs: no PNG round trip, deterministic per
    ``(shapes, style, per_class, image_size, seed)``.
    """
    rng = np.random.default_rng(seed)
    images = [np.asarray(_render(shape, style, image_size, rng))
              for shape in shapes for _ in range(per_class)]
    labels = np.repeat(np.arange(len(shapes), dtype=np.int64), per_class)
    return np.stack(images), labels
