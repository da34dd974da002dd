"""Smoke tests of the segmentation path: the real mmengine Runner, the tiny DeepLabV3 configs and
the generated Cityscapes / VOC layouts, on CPU. Plus the tools as subprocesses, and resume."""
from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner

from daft_mm.mm import compat  # the checkpoint allow-list

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIGS = REPO / 'configs' / '_tiny_'

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')


def _val_metrics(runner: Runner) -> dict:
    return {k[len('val/'):]: v.current() for k, v in runner.message_hub.log_scalars.items()
            if k.startswith('val/')}


@pytest.mark.parametrize('name,root_fixture,num_classes', [
    ('tiny_deeplabv3_cityscapes', 'cityscapes_root', 19),
    ('tiny_deeplabv3_voc', 'voc_seg_root', 21),
])
def test_one_iteration_and_evaluation(name, root_fixture, num_classes, tiny_cfg, request):
    cfg = tiny_cfg(name, request.getfixturevalue(root_fixture))
    runner = Runner.from_cfg(cfg)
    model = runner.model
    assert type(model).__name__ == 'EncoderDecoder'
    assert type(model.backbone).__name__ == 'ResNetV1c'
    assert type(model.decode_head).__name__ == 'ASPPHead'
    assert model.decode_head.conv_seg.out_channels == num_classes
    assert not any('SyncBatchNorm' in type(m).__name__ for m in model.modules())

    runner.train()

    assert runner.iter == 1
    loss = runner.message_hub.get_scalar('train/loss').current()
    assert math.isfinite(loss) and loss > 0
    metrics = _val_metrics(runner)
    assert 0.0 <= metrics['mIoU'] <= 100.0, metrics
    # The evaluation really saw the generated classes: the dataset reads all val images.
    assert len(runner.val_dataloader.dataset) == 2


def _run(args: list[str], python: str) -> str:
    proc = subprocess.run([python, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert proc.returncode == 0, f'{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout


def test_tools_train_then_test_print_miou(cityscapes_root, tmp_path, python):
    work_dir = tmp_path / 'work'
    opts = ['--cfg-options', f'data_root={cityscapes_root}', 'train_cfg.max_iters=1',
            'train_cfg.val_interval=1', 'default_hooks.logger.interval=1']
    config = str(TINY_CONFIGS / 'tiny_deeplabv3_cityscapes.py')
    out = _run(['tools/train.py', config, '--work-dir', str(work_dir), *opts], python)
    assert re.search(r'\[daft-mm\] seg final validation metrics: .*mIoU: \d', out), out[-2000:]
    ckpt = work_dir / 'iter_1.pth'
    assert ckpt.is_file()

    out = _run(['tools/test.py', config, str(ckpt), '--work-dir', str(tmp_path / 'test'),
                '--out', str(tmp_path / 'pred'), '--cfg-options', f'data_root={cityscapes_root}'],
               python)
    assert re.search(r'\[daft-mm\] seg test metrics: .*mIoU: \d', out), out[-2000:]
    assert len(list((tmp_path / 'pred').glob('*.png'))) == 2  # --out: one label map per image


class _IterRecorder(Hook):
    """Records the runner's iteration at every training step of this run."""

    def __init__(self) -> None:
        self.iters: list[int] = []

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.iters.append(runner.iter)


def test_resume_continues_the_iteration_count(cityscapes_root, tiny_cfg):
    # Validation at iter 1, checkpoint at iter 2: the checkpoint's message hub then holds
    # HistoryBuffers of NumPy arrays and the NumPy-scalar val/mIoU, what weights_only rejects.
    cfg = tiny_cfg('tiny_deeplabv3_cityscapes', cityscapes_root, **{
        'train_cfg.max_iters': 2, 'train_cfg.val_interval': 1,
        'default_hooks.checkpoint.interval': 2})
    Runner.from_cfg(cfg).train()
    ckpt = os.path.join(cfg.work_dir, 'iter_2.pth')
    saved = compat.load_checkpoint_file(ckpt, map_location='cpu')  # the allow-list at work
    if compat.torch_takes_allow_list():  # torch >= 2.6: registered for torch.load itself too
        torch.load(ckpt, map_location='cpu', weights_only=True)
    miou = saved['message_hub']['log_scalars']['val/mIoU']
    assert isinstance(miou, HistoryBuffer) and isinstance(miou.current(), np.floating)

    cfg = tiny_cfg('tiny_deeplabv3_cityscapes', cityscapes_root, **{
        'train_cfg.max_iters': 3, 'train_cfg.val_interval': 10**6})
    cfg.resume, cfg.load_from = True, None  # auto: the latest checkpoint in work_dir
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # no validation needed here
    runner = Runner.from_cfg(cfg)
    recorder = _IterRecorder()
    runner.register_hook(recorder)
    runner.train()
    assert recorder.iters == [2], 'resume should run only the third iteration'
    assert runner.iter == 3
    # The message hub came back from the checkpoint: iterations 1-2 logged before, 3 now.
    assert len(runner.message_hub.get_scalar('train/loss').data[0]) == 3
