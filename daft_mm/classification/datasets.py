"""A minimal image-folder reader (``root/<class>/<image>``) with PIL, since torchvision is absent.

OOD test sets must use the ID training set's class indices, so a dataset can be told its
class list instead of deriving it from its own folders.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ['IMAGE_EXTENSIONS', 'IMAGENET_MEAN', 'IMAGENET_STD', 'ImageFolder', 'list_classes']

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.ppm', '.gif', '.webp',
                              '.tif', '.tiff'})
#: The statistics torchvision-pretrained ResNets were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names under ``root`` (hidden folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'dataset folder {root} does not exist')
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))


class ImageFolder(Dataset):
    """``(image, label)`` pairs: float CHW tensors, normalised, optionally resized and flipped.

    Args:
        root: folder with one sub-folder per class.
        classes: the class list that fixes label indices (pass the ID training set's for
            test/OOD sets); a sub-folder not in it is an error, a missing one is allowed.
        image_size: resize every image to ``image_size x image_size`` (None keeps sizes,
            which then must agree within a batch).
        hflip: random horizontal flips, the only augmentation (for training sets).
    """

    def __init__(self, root: str | os.PathLike, *, classes: Sequence[str] | None = None,
                 image_size: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, hflip: bool = False) -> None:
        self.root = Path(root)
        found = list_classes(self.root)
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f'{self.root}: class folders {unknown} are not among the '
                             f'classes {self.classes}')
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [
            (path, self.class_to_idx[name])
            for name in found
            for path in sorted((self.root / name).rglob('*'))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not self.samples:
            raise ValueError(f'{self.root}: no images ({", ".join(sorted(IMAGE_EXTENSIONS))}) '
                             'found in class folders')
        self.image_size = image_size
        self.hflip = hflip
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert('RGB')
            if self.image_size is not None:
                image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        if self.hflip and torch.rand(()) < 0.5:  # torch RNG: follows torch.manual_seed
            tensor = tensor.flip(-1)
        return (tensor - self._mean) / self._std, label
