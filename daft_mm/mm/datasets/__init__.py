"""Dataset helpers: tiny deterministic datasets in the real Cityscapes / VOC layouts.

Dataset-specific transforms (e.g. the corruption transform) that register with mmseg/mmdet
registries belong in this package too and must be imported here.
"""
from .synthetic import (CITYSCAPES_CLASSES, CITYSCAPES_SCENE_CLASSES, IGNORE_INDEX, VOC_CLASSES,
                        VOC_DEFAULT_CLASSES, Style, make_cityscapes, make_voc)

__all__ = [
    'Style', 'make_cityscapes', 'make_voc', 'CITYSCAPES_CLASSES', 'CITYSCAPES_SCENE_CLASSES',
    'VOC_CLASSES', 'VOC_DEFAULT_CLASSES', 'IGNORE_INDEX'
]
from .transforms import CORRUPTION_GROUPS, ImageCorruption, corrupt_image, corruption_names  # noqa: E402

__all__ += ['ImageCorruption', 'CORRUPTION_GROUPS', 'corruption_names', 'corrupt_image']
