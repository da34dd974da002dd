"""Shared fixtures: tiny generated datasets (made once per session) and a builder of tiny configs.

Data fixtures return plain ``str`` paths, in the form each config's ``data_root`` expects:
``cityscapes_root`` (Cityscapes layout), ``voc_seg_root`` (``.../VOCdevkit/VOC2012``, mmseg) and
``voc_det_root`` (``.../VOCdevkit``, mmdet).
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIGS = REPO / 'configs' / '_tiny_'
# Images per split of the session datasets: enough for a batch of 4 and a 2-image evaluation.
NUM_TRAIN, NUM_VAL = 4, 2

_run_ids = itertools.count()


@pytest.fixture(scope='session')
def cityscapes_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    from daft_mm.mm.datasets import make_cityscapes
    root = tmp_path_factory.mktemp('cityscapes')
    make_cityscapes(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    return str(root)


@pytest.fixture(scope='session')
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The folder that holds ``VOCdevkit/``."""
    from daft_mm.mm.datasets import make_voc
    root = tmp_path_factory.mktemp('voc')
    make_voc(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    return str(root)


@pytest.fixture(scope='session')
def voc_seg_root(voc_root: str) -> str:
    return os.path.join(voc_root, 'VOCdevkit', 'VOC2012')


@pytest.fixture(scope='session')
def voc_det_root(voc_root: str) -> str:
    return os.path.join(voc_root, 'VOCdevkit')


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Callable[..., Any]:
    """``tiny_cfg(name, data_root, **cfg_options)`` -> Config of ``configs/_tiny_/<name>.py``.

    Defaults for a fast CPU run: 1 iteration, validation after it, no checkpoints unless asked,
    work_dir under the test's tmp_path and a unique experiment name (several Runners share a
    process; mmengine keys loggers and visualizers by that name).
    """
    from daft_mm.mm.cli import load_config

    def build(name: str, data_root: str, **options: Any):
        opts = {
            'data_root': data_root,
            'train_cfg.max_iters': 1,
            'train_cfg.val_interval': 1,
            'default_hooks.logger.interval': 1,
            'default_hooks.checkpoint.interval': 10**6,
        }
        opts.update(options)
        cfg = load_config(str(TINY_CONFIGS / f'{name}.py'), opts,
                          work_dir=str(tmp_path / 'work_dir'))
        cfg.experiment_name = f'{name}_{os.getpid()}_{next(_run_ids)}'
        return cfg

    return build


@pytest.fixture(scope='module')
def camvid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed real CamVid sample with its day/dusk split lists, a copy per test module
    (some modules add folders to it)."""
    import shutil
    root = tmp_path_factory.mktemp('camvid') / 'CamVid'
    shutil.copytree(REPO / 'tests' / 'samples' / 'camvid' / 'CamVid', root)
    from daft_mm.mm.datasets.camvid_splits import write_day_dusk_splits
    write_day_dusk_splits(root)
    return root


@pytest.fixture(scope='session')
def python() -> str:
    """The interpreter running the tests (the project's .venv), for tool subprocesses."""
    return sys.executable


@pytest.fixture
def one_torch_thread():
    """Tiny tensors gain nothing from threads; on a loaded shared CPU they cost a lot."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
