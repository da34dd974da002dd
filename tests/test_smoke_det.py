"""Smoke test of the detection path: the real mmengine Runner, the tiny Faster R-CNN config and
the generated VOC layout read by mmdet's stock VOCDataset, on CPU."""
from __future__ import annotations

import math

import pytest
from mmengine.runner import Runner

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')


def test_faster_rcnn_one_iteration_and_map(voc_det_root, tiny_cfg):
    cfg = tiny_cfg('tiny_faster-rcnn_voc', voc_det_root)
    runner = Runner.from_cfg(cfg)
    model = runner.model
    assert type(model).__name__ == 'FasterRCNN'
    assert type(model.neck).__name__ == 'FPN'
    assert model.roi_head.bbox_head.fc_cls.out_features == 20 + 1  # VOC classes + background

    runner.train()

    assert runner.iter == 1
    losses = {k: v.current() for k, v in runner.message_hub.log_scalars.items()
              if k.startswith('train/loss')}
    assert {'train/loss', 'train/loss_rpn_cls', 'train/loss_cls', 'train/loss_bbox'} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses
    mean_ap = runner.message_hub.get_scalar('val/pascal_voc/mAP').current()
    assert 0.0 <= mean_ap <= 1.0
    # mmdet read the generated XML: every training image has at least one box.
    train_set = runner.train_dataloader.dataset
    assert len(train_set) == 4
    assert all(len(train_set.get_data_info(i)['instances']) > 0 for i in range(len(train_set)))
