"""The benchmark's backbone pretrained on real photographs: an image classifier on Imagenette
(10 ImageNet classes, ``thunderInfy/imagenette``), the stand-in for ImageNet pretraining, which
cannot be downloaded here.

The backbone is the segmentation benchmark's own (mmseg ``ResNetV1c``, its config from
``configs/demo/_base_/demo_common.py``), trained as ImageNet ResNets are: standard strides, no
dilation (the segmentation config dilates the same weights), global average pooling and a linear
classifier that is thrown away. Images are decoded once, resized so that the short side is
``image_size * 8 / 7`` and kept in memory (a random ``image_size`` crop and a flip per step;
the centre crop for validation), normalised as the segmentation models' ``data_preprocessor``
does (RGB, ImageNet mean and std). The saved checkpoint holds the backbone only, in the keys
``init_cfg=dict(type='Pretrained', checkpoint=...)`` loads, with its provenance.

Reproducible: one seed gives the same weights and accuracy on the same machine and thread count.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import source_commit

__all__ = ['PretrainSettings', 'load_image_folder', 'pretrain_backbone', 'source_commit']

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class PretrainSettings:
    image_size: int = 64
    iters: int = 6000
    batch_size: int = 64
    lr: float = 0.2
    weight_decay: float = 5e-4
    warmup_iters: int = 200
    seed: int = 0
    threads: int = 2


def load_image_folder(root: Path, size: int, classes: Optional[List[str]] = None,
                      cache: Optional[Path] = None) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """``(images uint8 N x H x W x 3, labels, classes)``: every image of ``root/<class>/``,
    short side resized to ``size * 8 / 7`` and centre-cropped square to that length. ``cache``:
    an ``.npz`` reused while the folder's file list and the size are the same."""
    from PIL import Image
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(path, index) for index, name in enumerate(classes)
             for path in sorted((root / name).iterdir())
             if path.suffix.lower() in ('.jpeg', '.jpg', '.png')]
    if not files:
        raise FileNotFoundError(f'no images in the class folders of {root}')
    key = hashlib.sha1(json.dumps([size, classes, [(str(p.relative_to(root)), p.stat().st_size)
                                                   for p, _ in files]]).encode()).hexdigest()
    if cache is not None and cache.is_file():
        held = np.load(cache)
        if str(held['key']) == key:
            return held['images'], held['labels'], classes
    side = round(size * 8 / 7)
    images = np.empty((len(files), side, side, 3), np.uint8)
    for i, (path, _) in enumerate(files):
        with Image.open(path) as image:
            image = image.convert('RGB')
            w, h = image.size
            scale = side / min(w, h)
            image = image.resize((max(side, round(w * scale)), max(side, round(h * scale))),
                                 Image.BILINEAR)
            w, h = image.size
            left, top = (w - side) // 2, (h - side) // 2
            images[i] = np.asarray(image.crop((left, top, left + side, top + side)))
    labels = np.array([index for _, index in files], np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, labels=labels, key=key)
    return images, labels, classes


def _batch(images: np.ndarray, index: np.ndarray, size: int, g: torch.Generator,
           train: bool) -> torch.Tensor:
    x = torch.from_numpy(images[index]).permute(0, 3, 1, 2).float()
    side = x.shape[-1]
    if train:
        top, left = (int(v) for v in torch.randint(0, side - size + 1, (2, ), generator=g))
        x = x[..., top:top + size, left:left + size]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
    else:
        offset = (side - size) // 2
        x = x[..., offset:offset + size, offset:offset + size]
    return (x - MEAN) / STD


class Classifier(nn.Module):
    """The backbone, global average pooling of its last stage, a linear classifier."""

    def __init__(self, backbone: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def _build_backbone(backbone_cfg: Dict[str, Any]) -> Tuple[nn.Module, int]:
    from mmseg.registry import MODELS
    cfg = copy.deepcopy(backbone_cfg)
    # ImageNet-style: the segmentation config's dilation applies to the same weights later
    cfg.update(strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), contract_dilation=False,
               init_cfg=None, pretrained=None)
    backbone = MODELS.build(cfg)
    backbone.init_weights()
    backbone.eval()
    with torch.no_grad():
        channels = backbone(torch.zeros(1, 3, 64, 64))[-1].shape[1]
    backbone.train()
    return backbone, channels


@torch.no_grad()
def _accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 256):
        index = np.arange(start, min(start + 256, len(images)))
        logits = model(_batch(images, index, size, torch.Generator(), train=False))
        correct += int((logits.argmax(1).numpy() == labels[index]).sum())
    return 100.0 * correct / len(images)


def pretrain_backbone(backbone_cfg: Dict[str, Any], train_root: Path, val_root: Path,
                      out: Path, s: PretrainSettings = PretrainSettings(),
                      cache_dir: Optional[Path] = None,
                      log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train, check on ``val_root``, save the backbone to ``out``; returns the provenance."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    start = time.time()
    cache = (lambda name: None if cache_dir is None else
             cache_dir / f'{name}_{s.image_size}.npz')
    train_x, train_y, classes = load_image_folder(train_root, s.image_size, cache=cache('train'))
    val_x, val_y, _ = load_image_folder(val_root, s.image_size, classes, cache=cache('val'))
    log(f'pretraining on {len(train_x)} images of {len(classes)} classes ({train_root}), '
        f'checking on {len(val_x)} ({val_root}); decoded in {time.time() - start:.0f}s')
    backbone, channels = _build_backbone(backbone_cfg)
    model = Classifier(backbone, channels, len(classes))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    optimizer = torch.optim.SGD([{'params': decay, 'weight_decay': s.weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}],
                                lr=s.lr, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(
        1, s.warmup_iters)) * 0.5 * (1 + np.cos(np.pi * i / s.iters)))
    g = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(len(train_x), generator=g).numpy()
    position, losses = 0, []
    model.train()
    for step in range(1, s.iters + 1):
        if position + s.batch_size > len(order):
            order, position = torch.randperm(len(train_x), generator=g).numpy(), 0
        index = np.sort(order[position:position + s.batch_size])
        position += s.batch_size
        loss = F.cross_entropy(model(_batch(train_x, index, s.image_size, g, train=True)),
                               torch.from_numpy(train_y[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if step % max(1, s.iters // 20) == 0 or step == s.iters:
            log(f'  iter {step}/{s.iters}: loss {np.mean(losses[-50:]):.3f} '
                f'({time.time() - start:.0f}s)')
    accuracy = _accuracy(model, val_x, val_y, s.image_size)
    train_accuracy = _accuracy(model, train_x[:2000], train_y[:2000], s.image_size)
    provenance = {
        'data': {'train': str(train_root), 'val': str(val_root),
                 'repository': 'thunderInfy/imagenette', 'commit': source_commit(train_root),
                 'classes': classes, 'train_images': int(len(train_x)),
                 'val_images': int(len(val_x))},
        'settings': asdict(s),
        'backbone': {k: v for k, v in backbone_cfg.items() if k != 'init_cfg'},
        'val_top1': accuracy, 'train_top1_first_2000': train_accuracy,
        'chance_top1': 100.0 / len(classes),
        'final_loss': float(np.mean(losses[-50:])),
        'seconds': time.time() - start, 'torch': str(torch.__version__),
    }
    state = {f'backbone.{k}': v.detach().clone() for k, v in backbone.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    from daft_mm.utils import atomic_save
    atomic_save(lambda f: torch.save({'state_dict': state,
                                      'meta': json.loads(json.dumps(provenance, default=str))},
                                     f), str(out))
    log(f'Imagenette val top-1 {accuracy:.1f}% (chance {100.0 / len(classes):.0f}%), '
        f'backbone saved to {out} ({time.time() - start:.0f}s)')
    return provenance
