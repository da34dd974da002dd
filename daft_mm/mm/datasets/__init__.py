"""Dataset helpers: tiny deterministic datasets in the real Cityscapes / VOC layouts, and the
dataset-specific transforms (registered with the mmengine/mmcv TRANSFORMS registry on import).
"""
from .synthetic import (CITYSCAPES_CLASSES, CITYSCAPES_INSTANCE_CATEGORIES,
                        CITYSCAPES_SCENE_CLASSES, IGNORE_INDEX, VOC_CLASSES, VOC_DEFAULT_CLASSES,
                        Style, make_cityscapes, make_voc, write_cityscapes_instances)
from .camvid import CAMVID_CLASSES, CamVidDataset
from .transforms import CORRUPTION_GROUPS, ImageCorruption, corrupt_image, corruption_names

__all__ = [
    'Style', 'make_cityscapes', 'make_voc', 'write_cityscapes_instances',
    'CITYSCAPES_INSTANCE_CATEGORIES', 'CITYSCAPES_CLASSES', 'CITYSCAPES_SCENE_CLASSES',
    'VOC_CLASSES', 'VOC_DEFAULT_CLASSES', 'IGNORE_INDEX', 'ImageCorruption', 'CORRUPTION_GROUPS',
    'corruption_names', 'corrupt_image', 'CamVidDataset', 'CAMVID_CLASSES'
]
