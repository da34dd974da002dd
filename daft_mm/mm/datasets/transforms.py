"""``ImageCorruption``: the standard common corruptions (ImageNet-C / Cityscapes-C / COCO-C
style) as a data transform, so any mmseg/mmdet test pipeline can measure robustness.

Registered in mmengine's root ``TRANSFORMS`` registry (through mmcv's), which the mmseg and mmdet
registries fall back to, so ``dict(type='ImageCorruption', ...)`` works under either scope.

The corruptions come from the ``imagecorruptions`` module, installed by the maintained fork
``imagecorruptions-imaug`` (the original ``imagecorruptions`` 1.1.2 calls
``skimage.filters.gaussian(multichannel=...)``, removed in scikit-image 0.19, so ``glass_blur`` and
``gaussian_blur`` fail there).
"""
from __future__ import annotations

import hashlib
import os.path as osp
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from mmcv.transforms import BaseTransform
from mmcv.transforms import TRANSFORMS

__all__ = ['ImageCorruption', 'CORRUPTION_GROUPS', 'corruption_names', 'corrupt_image']

_NOISE = ('gaussian_noise', 'shot_noise', 'impulse_noise')
_BLUR = ('defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur')
_WEATHER = ('snow', 'frost', 'fog', 'brightness')
_DIGITAL = ('contrast', 'elastic_transform', 'pixelate', 'jpeg_compression')
_HOLDOUT = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
_OWN_RNG = ('glass_blur', 'impulse_noise')

#: Named groups, as in the ImageNet-C benchmark and mmdet's robustness tool: ``benchmark`` is the
#: 15 standard corruptions, ``holdout`` the 4 extra ones, ``all`` both.
CORRUPTION_GROUPS: Dict[str, Tuple[str, ...]] = {
    'noise': _NOISE,
    'blur': _BLUR,
    'weather': _WEATHER,
    'digital': _DIGITAL,
    'benchmark': _NOISE + _BLUR + _WEATHER + _DIGITAL,
    'holdout': _HOLDOUT,
    'all': _NOISE + _BLUR + _WEATHER + _DIGITAL + _HOLDOUT,
}


def corruption_names(selection: Sequence[str] | str = 'benchmark') -> List[str]:
    """Expand group names and single corruption names to an ordered, de-duplicated list."""
    items = [selection] if isinstance(selection, str) else list(selection)
    if not items:
        raise ValueError('no corruption given; name a group '
                         f'({", ".join(CORRUPTION_GROUPS)}) or a corruption')
    out: List[str] = []
    for item in items:
        names = CORRUPTION_GROUPS.get(item, (item, ))
        for name in names:
            if name not in CORRUPTION_GROUPS['all']:
                raise ValueError(f'unknown corruption {name!r}; groups: {sorted(CORRUPTION_GROUPS)}; '
                                 f'corruptions: {list(CORRUPTION_GROUPS["all"])}')
            if name not in out:
                out.append(name)
    return out


def _library():
    try:
        import imagecorruptions
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'ImageCorruption needs the `imagecorruptions` module: pip install '
            '"imagecorruptions-imaug==1.1.5" (a maintained fork of imagecorruptions that works '
            'with current scikit-image/NumPy)') from exc
    return imagecorruptions


@contextmanager
def _seeded_numpy(seed: Optional[int]) -> Iterator[None]:
    """The corruption functions draw from NumPy's global RNG; seed it for the call and restore the
    caller's state afterwards, so a seeded corruption neither depends on nor disturbs other code."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def corrupt_image(img: np.ndarray, corruption: str, severity: int, *,
                  seed: Optional[int] = None, channel_order: str = 'bgr') -> np.ndarray:
    """Corrupt one image (HxW or HxWxC, uint8 or float in 0..255); same shape and dtype back.

    ``channel_order`` is the order of ``img`` (mmcv loads BGR); the library works on RGB.
    Severity 0 returns the image unchanged (the clean column of robustness tables).
    """
    if corruption not in CORRUPTION_GROUPS['all']:
        corruption_names(corruption)  # raises with the list of valid names
    if not isinstance(severity, (int, np.integer)) or not 0 <= severity <= 5:
        raise ValueError(f'severity must be an int in 0..5, got {severity!r}')
    if channel_order not in ('bgr', 'rgb'):
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
    if severity == 0:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        img3 = np.repeat(img, 3, axis=2)
    elif img.ndim == 2:
        img3 = np.repeat(img[..., None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 3:
        img3 = img
    else:
        raise ValueError(f'ImageCorruption needs an HxW, HxWx1 or HxWx3 image, got shape {img.shape}')
    rgb = np.clip(np.rint(img3), 0, 255).astype(np.uint8) if img3.dtype != np.uint8 else img3
    if channel_order == 'bgr':
        rgb = rgb[..., ::-1]
    # glass_blur (numba) and impulse_noise (scikit-image) use their own generators: they take the
    # seed as an argument; the others draw from NumPy's global state.
    kwargs = {'seed': seed} if seed is not None and corruption in _OWN_RNG else {}
    with _seeded_numpy(seed):
        out = _library().corrupt(np.ascontiguousarray(rgb), corruption_name=corruption,
                                 severity=int(severity), **kwargs)
    out = np.asarray(out)
    if out.shape[:2] != rgb.shape[:2]:  # a few corruptions round sizes on odd inputs
        out = cv2.resize(out, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = np.clip(np.rint(out.astype(np.float32)), 0, 255).astype(np.uint8)
    if channel_order == 'bgr':
        out = out[..., ::-1]
    if img.ndim == 2 or img.shape[2] == 1:
        out = out.mean(axis=2, keepdims=img.ndim == 3).round().astype(np.uint8)
    return np.ascontiguousarray(out.astype(img.dtype, copy=False))


@TRANSFORMS.register_module()
class ImageCorruption(BaseTransform):
    """Apply one common corruption at one severity to ``results['img']``.

    Put it right after the image is loaded (corruptions are defined on the original image), e.g.::

        test_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='ImageCorruption', corruption='gaussian_noise', severity=3),
            dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
            ...]

    Labels and boxes are left as they are; ``elastic_transform`` moves image content slightly, as
    in the standard benchmarks.

    Args:
        corruption: one of :data:`CORRUPTION_GROUPS` ``['all']``.
        severity: 1 (mild) .. 5 (strong); 0 leaves the image as it is.
        seed: with an int, each image's corruption is drawn from a generator seeded by ``seed`` and
            the image's file name (not its full path: the same dataset copied elsewhere gets the
            same corruptions), so every model (and every dataloader worker layout) sees exactly
            the same corrupted test set; ``None`` draws from NumPy's global state.
    Required keys: ``img`` (and ``img_path`` for per-image seeds). Modified keys: ``img``.
    """

    def __init__(self, corruption: str, severity: int = 3, seed: Optional[int] = 0) -> None:
        corruption_names(corruption)  # validates now, at pipeline build time
        if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
                or not 0 <= severity <= 5:
            raise ValueError(f'ImageCorruption.severity must be an int in 0..5, got {severity!r}')
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise ValueError(f'ImageCorruption.seed must be an int or None, got {seed!r}')
        if severity > 0:
            _library()  # fail at build time when the library is missing
        self.corruption = corruption
        self.severity = int(severity)
        self.seed = seed

    def _image_seed(self, results: dict) -> Optional[int]:
        if self.seed is None:
            return None
        name = osp.basename(str(results.get('img_path', '')))
        key = f'{self.seed}|{name}|{self.corruption}|{self.severity}'
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], 'little')

    def transform(self, results: dict) -> dict:
        if 'img' not in results:
            raise KeyError('ImageCorruption needs results["img"]: place it after LoadImageFromFile')
        results['img'] = corrupt_image(results['img'], self.corruption, self.severity,
                                       seed=self._image_seed(results))
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(corruption={self.corruption!r}, '
                f'severity={self.severity}, seed={self.seed})')
