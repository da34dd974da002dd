"""ImageCorruption on real mmseg pipelines, tools/test_robustness.py on a tiny trained checkpoint,
and the OOD test configs (ACDC, Dark Zurich) against their documented folder layouts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from _tools import load_tool
from daft_mm.mm import robustness

REPO = Path(__file__).resolve().parents[1]


def _tool():
    return load_tool('test_robustness')


@pytest.fixture(autouse=True)
def _mmseg_scope():
    import daft_mm  # noqa: F401
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')


def _cityscapes_dataset(root: str, pipeline: list):
    from mmseg.registry import DATASETS
    return DATASETS.build(dict(type='CityscapesDataset', data_root=root,
                               data_prefix=dict(img_path='leftImg8bit/val',
                                                seg_map_path='gtFine/val'),
                               pipeline=pipeline))


# ------------------------------------------------------------------------------ the transform
def test_corruption_names_groups_and_errors():
    from daft_mm.mm.datasets.transforms import corruption_names
    assert len(corruption_names('benchmark')) == 15
    assert len(corruption_names('all')) == 19
    assert corruption_names(['noise', 'fog', 'gaussian_noise']) == [
        'gaussian_noise', 'shot_noise', 'impulse_noise', 'fog']
    with pytest.raises(ValueError, match='unknown corruption .gausian_noise.*gaussian_noise'):
        corruption_names(['gausian_noise'])


def test_transform_rejects_bad_arguments():
    from mmseg.registry import TRANSFORMS
    with pytest.raises(ValueError, match='unknown corruption'):
        TRANSFORMS.build(dict(type='ImageCorruption', corruption='rain'))
    for bad in (6, -1, 2.5, True):
        with pytest.raises(ValueError, match='severity'):
            TRANSFORMS.build(dict(type='ImageCorruption', corruption='fog', severity=bad))


def test_transform_in_mmseg_pipeline_is_seeded_and_keeps_labels(cityscapes_root):
    load = [dict(type='LoadImageFromFile')]
    rest = [dict(type='Resize', scale=(128, 64), keep_ratio=True), dict(type='LoadAnnotations'),
            dict(type='PackSegInputs')]
    corrupt = dict(type='ImageCorruption', corruption='gaussian_noise', severity=3)
    clean = _cityscapes_dataset(cityscapes_root, load + rest)[0]
    noisy = _cityscapes_dataset(cityscapes_root, load + [corrupt] + rest)[0]
    again = _cityscapes_dataset(cityscapes_root, load + [corrupt] + rest)[0]
    a, b, c = (x['inputs'].numpy().astype(int) for x in (clean, noisy, again))
    assert a.shape == b.shape
    assert np.abs(a - b).mean() > 5  # visibly corrupted
    np.testing.assert_array_equal(b, c)  # same image, same seed: same corruption
    np.testing.assert_array_equal(clean['data_samples'].gt_sem_seg.data.numpy(),
                                  noisy['data_samples'].gt_sem_seg.data.numpy())
    # The next image gets its own noise, not a copy of the first one's.
    second = _cityscapes_dataset(cityscapes_root, load + [corrupt] + rest)[1]['inputs'].numpy()
    assert not np.array_equal(b - a, second.astype(int) - _cityscapes_dataset(
        cityscapes_root, load + rest)[1]['inputs'].numpy().astype(int))


def test_transform_is_visible_from_mmdet_scope():
    from mmdet.registry import TRANSFORMS
    t = TRANSFORMS.build(dict(type='ImageCorruption', corruption='motion_blur', severity=2))
    out = t(dict(img=np.full((40, 48, 3), 128, np.uint8), img_path='x.png'))
    assert out['img'].shape == (40, 48, 3) and out['img'].dtype == np.uint8


@pytest.mark.parametrize('shape,dtype', [((40, 48), np.uint8), ((40, 48, 1), np.uint8),
                                         ((40, 48, 3), np.float32)])
def test_corrupt_image_keeps_shape_and_dtype(shape, dtype):
    from daft_mm.mm.datasets.transforms import corrupt_image
    img = (np.random.default_rng(0).random(shape) * 255).astype(dtype)
    out = corrupt_image(img, 'shot_noise', 4, seed=1)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert corrupt_image(img, 'shot_noise', 0) is img  # severity 0 = clean


def test_seeded_corruption_leaves_global_numpy_state_alone():
    from daft_mm.mm.datasets.transforms import corrupt_image
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    corrupt_image(np.zeros((32, 32, 3), np.uint8), 'gaussian_noise', 2, seed=5)
    assert np.random.rand() == expected


# ------------------------------------------------------------------------------ the tool
def test_with_corruption_inserts_after_loading_in_every_dataset():
    from mmengine.config import ConfigDict
    with_corruption = robustness.with_corruption
    pipe = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(8, 8))]
    cfg = ConfigDict(dataset=dict(type='ConcatDataset', datasets=[
        dict(type='A', pipeline=pipe), dict(type='RepeatDataset', dataset=dict(type='B',
                                                                               pipeline=pipe))]))
    out = with_corruption(cfg, 'fog', 2, seed=0)
    for ds in (out.dataset.datasets[0], out.dataset.datasets[1].dataset):
        assert [t['type'] for t in ds.pipeline] == ['LoadImageFromFile', 'ImageCorruption',
                                                    'Resize']
    assert len(cfg.dataset.datasets[0].pipeline) == 2  # the original is untouched
    with pytest.raises(ValueError, match='LoadImageFrom'):
        with_corruption(ConfigDict(dataset=dict(pipeline=[dict(type='Resize')])), 'fog', 1, 0)


def test_test_robustness_on_tiny_checkpoint(tiny_cfg, cityscapes_root, tmp_path):
    from mmengine.runner import Runner
    test_robustness = _tool()
    cfg = tiny_cfg('tiny_deeplabv3_cityscapes', cityscapes_root,
                   **{'train_cfg.val_interval': 100, 'default_hooks.checkpoint.interval': 1})
    Runner.from_cfg(cfg).train()
    ckpt = Path(cfg.work_dir) / 'iter_1.pth'
    assert ckpt.is_file()
    out = tmp_path / 'robustness'
    config = str(REPO / 'configs' / '_tiny_' / 'tiny_deeplabv3_cityscapes.py')
    res = test_robustness.main([config, str(ckpt), '--corruptions', 'gaussian_noise', 'fog',
                                '--severities', '5', '--work-dir', str(out),
                                '--cfg-options', f'data_root={cityscapes_root}'])
    assert res['metric'] == 'mIoU'
    assert set(res['corrupted']) == {'gaussian_noise', 'fog'}
    values = [res['clean'], res['summary']['mPC'], res['summary']['rPC']] + [
        v['5'] for v in res['corrupted'].values()]
    assert all(math.isfinite(v) for v in values)
    on_disk = json.loads((out / 'robustness.json').read_text())
    assert on_disk['corrupted'] == res['corrupted']
    assert on_disk['summary']['mPC'] == pytest.approx(np.mean([v['5'] for v in
                                                               res['corrupted'].values()]))
    assert '| gaussian_noise |' in (out / 'robustness.md').read_text()
    assert (out / 'robustness.png').stat().st_size > 1000
    # --resume with everything done evaluates nothing and returns the same numbers.
    again = test_robustness.main([config, str(ckpt), '--corruptions', 'gaussian_noise', 'fog',
                                  '--severities', '5', '--work-dir', str(out), '--resume',
                                  '--skip-clean', '--cfg-options',
                                  f'data_root={cityscapes_root}'])
    assert again['corrupted'] == res['corrupted'] and again['clean'] == res['clean']


def test_test_robustness_rejects_unknown_corruption(tmp_path):
    test_robustness = _tool()
    ckpt = tmp_path / 'x.pth'
    ckpt.write_bytes(b'')
    with pytest.raises(ValueError, match='unknown corruption'):
        test_robustness.main([str(REPO / 'configs/_tiny_/tiny_deeplabv3_cityscapes.py'),
                              str(ckpt), '--corruptions', 'blurr'])


# ------------------------------------------------------------------------------ OOD configs
def _png(path: Path, shape: tuple) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.zeros(shape, np.uint8))


def test_acdc_and_dark_zurich_configs_read_the_released_layouts(tmp_path):
    from daft_mm.mm.cli import load_config
    from mmseg.registry import DATASETS
    acdc = tmp_path / 'acdc'
    for cond in ('fog', 'night', 'rain', 'snow'):
        for split in ('val', 'val_ref', 'train'):  # only val must be read
            stem = f'GOPR0475_frame_0000{len(split)}1'
            _png(acdc / 'rgb_anon' / cond / split / 'GOPR0475' / f'{stem}_rgb_anon.png',
                 (36, 64, 3))
            if split != 'val_ref':
                _png(acdc / 'gt' / cond / split / 'GOPR0475' / f'{stem}_gt_labelTrainIds.png',
                     (36, 64))
    for cond in ('fog', 'night', 'rain', 'snow'):
        cfg = load_config(str(REPO / f'configs/ood/acdc_{cond}.py'), {'data_root': str(acdc)})
        ds = DATASETS.build(cfg.test_dataloader.dataset)
        assert len(ds) == 1
        info = ds.get_data_info(0)
        assert f'/rgb_anon/{cond}/val/' in info['img_path']
        assert info['seg_map_path'].endswith(f'/gt/{cond}/val/GOPR0475/GOPR0475_frame_000031'
                                             '_gt_labelTrainIds.png')
    cfg = load_config(str(REPO / 'configs/ood/acdc_all.py'), {'data_root': str(acdc)})
    assert len(DATASETS.build(cfg.test_dataloader.dataset)) == 4

    dz = tmp_path / 'dark_zurich'
    _png(dz / 'rgb_anon/val/night/GOPR0356/GOPR0356_frame_000321_rgb_anon.png', (36, 64, 3))
    _png(dz / 'rgb_anon/val_ref/day/GOPR0356_ref/GOPR0356_ref_frame_000321_rgb_anon.png',
         (36, 64, 3))
    _png(dz / 'gt/val/night/GOPR0356/GOPR0356_frame_000321_gt_labelTrainIds.png', (36, 64))
    cfg = load_config(str(REPO / 'configs/ood/dark_zurich.py'), {'data_root': str(dz)})
    ds = DATASETS.build(cfg.test_dataloader.dataset)
    assert len(ds) == 1 and ds[0]['data_samples'].gt_sem_seg.data.shape[-2:] == (36, 64)


def test_corruption_seed_follows_the_file_name_not_the_folder():
    """The same dataset copied to another folder gets the same corrupted test set."""
    from daft_mm.mm.datasets.transforms import ImageCorruption
    t = ImageCorruption('gaussian_noise', severity=3, seed=0)
    img = np.full((40, 48, 3), 100, np.uint8)
    a = t(dict(img=img.copy(), img_path='/data/a/frankfurt_000000_000001_leftImg8bit.png'))['img']
    b = t(dict(img=img.copy(), img_path='/tmp/b/frankfurt_000000_000001_leftImg8bit.png'))['img']
    c = t(dict(img=img.copy(), img_path='/data/a/frankfurt_000000_000002_leftImg8bit.png'))['img']
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
