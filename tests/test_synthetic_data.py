"""The generated datasets: deterministic, style-independent labels, and read by the *stock*
mmseg / mmdet dataset classes with the stock layouts."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daft_mm.mm.datasets import (CITYSCAPES_SCENE_CLASSES, IGNORE_INDEX, VOC_CLASSES, Style,
                                 make_cityscapes, make_voc)


def _arrays(root: Path, pattern: str) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.array(Image.open(p)) for p in sorted(root.glob(pattern))}


def test_cityscapes_is_deterministic_and_style_keeps_labels(tmp_path):
    a = make_cityscapes(tmp_path / 'a', num_train=2, num_val=1, seed=3)
    b = make_cityscapes(tmp_path / 'b', num_train=2, num_val=1, seed=3)
    shifted = make_cityscapes(tmp_path / 'c', num_train=2, num_val=1, seed=3,
                              style=dict(brightness=0.6, color_shift=(0, 0, 30), noise_std=5,
                                         blur_sigma=1.0, palette={13: (200, 200, 0)}))
    other_seed = make_cityscapes(tmp_path / 'd', num_train=2, num_val=1, seed=4)
    imgs, labels = '**/*_leftImg8bit.png', '**/*_labelTrainIds.png'
    assert len(_arrays(a, imgs)) == 3
    for pattern in (imgs, labels):
        xa, xb = _arrays(a, pattern), _arrays(b, pattern)
        assert xa.keys() == xb.keys() and all(np.array_equal(xa[k], xb[k]) for k in xa)
    la, lc = _arrays(a, labels), _arrays(shifted, labels)
    assert all(np.array_equal(la[k], lc[k]) for k in la), 'a style must not move labels'
    ia, ic = _arrays(a, imgs), _arrays(shifted, imgs)
    assert all(np.abs(ia[k].astype(int) - ic[k]).mean() > 10 for k in ia)
    assert any(not np.array_equal(la[k], v) for k, v in _arrays(other_seed, labels).items())
    for lab in la.values():
        assert lab.shape == (64, 128) and lab.dtype == np.uint8
        present = set(np.unique(lab).tolist())
        assert present <= set(CITYSCAPES_SCENE_CLASSES) | {IGNORE_INDEX}
        assert len(present - {IGNORE_INDEX}) >= 5  # several classes per scene


def test_stock_mmseg_datasets_read_the_layouts(cityscapes_root, voc_seg_root):
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets import CityscapesDataset, PascalVOCDataset
    from mmseg.datasets.transforms import LoadAnnotations
    # Transform objects, not dicts: dicts would resolve in whatever registry scope is current.
    pipeline = [LoadImageFromFile(), LoadAnnotations()]
    cs = CityscapesDataset(data_root=cityscapes_root, pipeline=pipeline,
                           data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'))
    assert len(cs) == 2
    sample = cs[0]
    assert sample['img'].shape == (64, 128, 3)
    assert set(np.unique(sample['gt_seg_map'])) <= set(CITYSCAPES_SCENE_CLASSES) | {IGNORE_INDEX}

    voc = PascalVOCDataset(data_root=voc_seg_root, pipeline=pipeline,
                           ann_file='ImageSets/Segmentation/train.txt',
                           data_prefix=dict(img_path='JPEGImages',
                                            seg_map_path='SegmentationClass'))
    assert len(voc) == 4
    seg = voc[0]['gt_seg_map']
    assert seg.shape == (96, 128)
    values = set(np.unique(seg).tolist())
    assert 0 in values and IGNORE_INDEX in values and values - {0, IGNORE_INDEX}
    assert max(values - {IGNORE_INDEX}) < len(VOC_CLASSES)


def test_stock_mmdet_voc_dataset_reads_boxes_matching_the_masks(voc_det_root):
    from mmdet.datasets import VOCDataset
    ds = VOCDataset(data_root=voc_det_root, ann_file='VOC2012/ImageSets/Main/trainval.txt',
                    data_prefix=dict(sub_data_root='VOC2012/'), pipeline=[])
    assert len(ds) == 4 and ds.metainfo['dataset_type'] == 'VOC2012'
    seg_dir = Path(voc_det_root) / 'VOC2012' / 'SegmentationClass'
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        assert (info['height'], info['width']) == (96, 128) and info['instances']
        mask = np.array(Image.open(seg_dir / f"{info['img_id']}.png"))
        for inst in info['instances']:
            x0, y0, x1, y1 = inst['bbox']
            assert 0 <= x0 < x1 <= 127 and 0 <= y0 < y1 <= 95
            voc_index = inst['bbox_label'] + 1  # mmdet has no background class
            assert (mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1] == voc_index).any()
    test_set = VOCDataset(data_root=voc_det_root, ann_file='VOC2012/ImageSets/Main/test.txt',
                          data_prefix=dict(sub_data_root='VOC2012/'), pipeline=[], test_mode=True)
    assert len(test_set) == 2


def test_voc_difficult_flag_marks_mostly_hidden_objects(tmp_path):
    root = make_voc(tmp_path, num_train=24, num_val=0, seed=1, max_objects=3)
    flags = [int(o.findtext('difficult'))
             for xml in (root / 'VOCdevkit/VOC2012/Annotations').glob('*.xml')
             for o in ET.parse(xml).findall('object')]
    assert set(flags) == {0, 1}, 'expected both easy and difficult objects in 24 images'
    ids = (root / 'VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt').read_text().split()
    assert ids == (root / 'VOCdevkit/VOC2012/ImageSets/Main/trainval.txt').read_text().split()
    assert (root / 'VOCdevkit/VOC2012/ImageSets/Main/test.txt').read_text() == ''
    png = Image.open(root / 'VOCdevkit/VOC2012/SegmentationClass' / f'{ids[0]}.png')
    assert png.mode == 'P'  # indexed colour, as the real SegmentationClass PNGs


@pytest.mark.parametrize('call,match', [
    (lambda r: make_cityscapes(r, num_train=-1, num_val=1), 'num_train'),
    (lambda r: make_cityscapes(r, num_train=0, num_val=0), 'nothing to generate'),
    (lambda r: make_cityscapes(r, num_train=1, num_val=0, size=(16, 16)), 'at least'),
    (lambda r: make_cityscapes(r, num_train=1, num_val=0, style={'fog': 1}), 'unknown style keys'),
    (lambda r: make_voc(r, num_train=1, num_val=0, classes=('plane', )), 'unknown'),
    (lambda r: make_voc(r, num_train=1, num_val=0, style=Style(brightness=-1)), 'brightness'),
])
def test_bad_arguments_name_the_problem(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path)
