"""The tiny configs: stock mmseg::/mmdet:: bases resolve, CPU-safe settings, task detection and
the data_root override that the tools apply."""
from __future__ import annotations

from pathlib import Path

import pytest
from mmengine.config import Config

from daft_mm.mm.cli import detect_task, load_config, set_data_root

TINY = Path(__file__).resolve().parents[1] / 'configs' / '_tiny_'
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


@pytest.mark.parametrize('name,task', [('tiny_deeplabv3_cityscapes', 'seg'),
                                       ('tiny_deeplabv3_voc', 'seg'),
                                       ('tiny_faster-rcnn_voc', 'det')])
def test_config_is_cpu_safe_and_data_root_overridable(name, task, tmp_path):
    cfg = load_config(str(TINY / f'{name}.py'), {'data_root': str(tmp_path)})
    assert detect_task(cfg) == task
    assert 'SyncBN' not in cfg.pretty_text
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model.get('pretrained') is None and cfg.model.backbone.get('init_cfg') is None
    for key in LOADERS:
        assert cfg[key].dataset.data_root == str(tmp_path), key
        assert cfg[key].num_workers == 0


def test_set_data_root_keeps_datasets_from_other_roots():
    cfg = Config(dict(data_root='a', train_dataloader=dict(dataset=dict(
        type='ConcatDataset', datasets=[dict(data_root='a'), dict(data_root='other')]))))
    assert set_data_root(cfg, 'b') == 1
    assert [d['data_root'] for d in cfg.train_dataloader.dataset.datasets] == ['b', 'other']


def test_unknown_task_and_missing_config_are_explained(tmp_path):
    with pytest.raises(ValueError, match="default_scope"):
        detect_task(Config(dict(model=dict(type='NoSuchModel'))))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_config(str(tmp_path / 'missing.py'))
