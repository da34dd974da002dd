"""daft_mm.mm.compat: the weights_only allow-list, its opt-in, and the pkg_resources check."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from daft_mm.mm import compat


class Opaque:
    """A class no allow-list knows (stands for an object a legacy checkpoint might hold)."""


@pytest.fixture
def untrusted(monkeypatch):
    monkeypatch.delenv(compat.TRUST_ENV, raising=False)
    compat.trust_checkpoints(None)  # decided by the environment
    yield
    compat.trust_checkpoints(None)


def test_mmengine_objects_load_with_weights_only(tmp_path, untrusted):
    buf = HistoryBuffer()
    buf.update(np.float64(0.5))
    path = tmp_path / 'hub.pth'
    torch.save({'buf': buf, 'metric': np.float64(71.25), 'arr': np.arange(3, dtype=np.int64),
                'state_dict': {'w': torch.ones(2)}}, path)
    ckpt = CheckpointLoader.load_checkpoint(str(path))
    assert ckpt['buf'].current() == 0.5 and ckpt['buf'].mean() == 0.5
    assert ckpt['metric'] == 71.25 and ckpt['arr'].tolist() == [0, 1, 2]


def test_unknown_global_names_itself_and_the_opt_in(tmp_path, untrusted, monkeypatch):
    path = tmp_path / 'legacy.pth'
    torch.save({'meta': Opaque()}, path)
    with pytest.raises(pickle.UnpicklingError) as info:
        CheckpointLoader.load_checkpoint(str(path))
    message = str(info.value)
    assert 'Opaque' in message and compat.TRUST_ENV in message and 'trust_checkpoints' in message

    monkeypatch.setenv(compat.TRUST_ENV, '1')
    assert isinstance(CheckpointLoader.load_checkpoint(str(path))['meta'], Opaque)
    monkeypatch.delenv(compat.TRUST_ENV)
    compat.trust_checkpoints()
    assert isinstance(CheckpointLoader.load_checkpoint(str(path))['meta'], Opaque)


def test_getattr_is_allowed_only_for_history_buffer_statistics(tmp_path, untrusted):
    path = tmp_path / 'getattr.pth'
    # Pickled as getattr(HistoryBuffer, '__init__'): must not pass as a statistics method.
    torch.save({'f': HistoryBuffer.__init__}, path)
    with pytest.raises(pickle.UnpicklingError, match=compat.TRUST_ENV):
        CheckpointLoader.load_checkpoint(str(path))


def test_missing_checkpoint_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='can not be found'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'nope.pth'))


def test_missing_pkg_resources_points_to_the_installer(monkeypatch):
    monkeypatch.setitem(__import__('sys').modules, 'pkg_resources', None)  # as if uninstalled
    with pytest.raises(ImportError, match='tools/install.sh'):
        compat.require_pkg_resources()
