"""daft_mm.mm.compat: checkpoint loading (allow-list, restricted unpickling, opt-in) on every torch,
and the pkg_resources check.

The checkpoint tests run once per unpickling mechanism: ``torch`` (torch's own ``weights_only``
unpickler with the allow-list; where torch can take it, 2.6+) and ``restricted`` (daft-mm's
allow-list ``pickle.Unpickler``, what torch 2.1-2.5 use; it runs on newer torch too, so both lanes
test it).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader, load_checkpoint

from daft_mm.mm import compat, safe_load


class Opaque:
    """A class no allow-list knows (stands for an object a legacy checkpoint might hold)."""


class RunsCode:
    """A crafted pickle payload: unpickling it calls ``fn(*args)`` (``__reduce__``), here a write of
    a marker file, the harmless stand-in for what an attacker would run."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def exec_payload(marker: Path) -> RunsCode:
    return RunsCode(exec, f'open({str(marker)!r}, "w").write("pwned")')


def system_payload(marker: Path) -> RunsCode:
    return RunsCode(os.system, f'touch {marker}')


@pytest.fixture
def untrusted(monkeypatch):
    monkeypatch.delenv(compat.TRUST_ENV, raising=False)
    compat.trust_checkpoints(None)  # decided by the environment
    yield
    compat.trust_checkpoints(None)


@pytest.fixture(params=['torch', 'restricted'])
def mechanism(request, monkeypatch) -> str:
    """Which unpickler the project's loaders use in this test."""
    if request.param == 'torch' and not compat.torch_takes_allow_list():
        pytest.skip(f"torch {torch.__version__}'s weights_only unpickler cannot take the allow-list "
                    '(found by the probe): the restricted unpickler is what runs here')
    monkeypatch.setattr(safe_load, '_TAKES_ALLOW_LIST', request.param == 'torch')
    return request.param


def test_the_mechanism_is_chosen_by_probing_torch():
    # torch < 2.5 has no safe_globals context at all: the probe must say no there.
    serialization = torch.serialization
    if not hasattr(serialization, 'add_safe_globals') or not hasattr(serialization, 'safe_globals'):
        assert not compat.torch_takes_allow_list()
    assert compat.torch_takes_allow_list() == safe_load._probe_allow_list()


def test_mmengine_objects_load(tmp_path, untrusted, mechanism):
    buf = HistoryBuffer()
    buf.update(np.float64(0.5))
    path = tmp_path / 'hub.pth'
    torch.save({'buf': buf, 'metric': np.float64(71.25), 'arr': np.arange(3, dtype=np.int64),
                'state_dict': {'w': torch.ones(2)}, 'p': nn.Parameter(torch.zeros(2))}, path)
    for legacy in (False, True):  # the zip format, and torch's pre-1.6 one
        if legacy:
            torch.save(torch.load(path, weights_only=False), path, _use_new_zipfile_serialization=False)
        ckpt = CheckpointLoader.load_checkpoint(str(path))
        assert ckpt['buf'].current() == 0.5 and ckpt['buf'].mean() == 0.5
        assert ckpt['metric'] == 71.25 and ckpt['arr'].tolist() == [0, 1, 2]
        assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))
        assert isinstance(ckpt['p'], nn.Parameter)


def test_unknown_global_names_itself_and_the_opt_in(tmp_path, untrusted, mechanism, monkeypatch):
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


def test_getattr_is_allowed_only_for_history_buffer_statistics(tmp_path, untrusted, mechanism):
    path = tmp_path / 'getattr.pth'
    # Pickled as getattr(HistoryBuffer, '__init__'): must not pass as a statistics method.
    torch.save({'f': HistoryBuffer.__init__}, path)
    with pytest.raises(pickle.UnpicklingError, match=compat.TRUST_ENV):
        CheckpointLoader.load_checkpoint(str(path))


@pytest.mark.parametrize('payload', [exec_payload, system_payload])
@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy-format'])
def test_a_crafted_pickle_cannot_run_code(tmp_path, untrusted, mechanism, payload, legacy):
    """Every project loader refuses a checkpoint whose pickle calls a function, before calling it."""
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'meta': payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    loaders = {
        'load_checkpoint_file': lambda: compat.load_checkpoint_file(str(path)),
        'CheckpointLoader': lambda: CheckpointLoader.load_checkpoint(str(path)),
        'mmengine load_checkpoint': lambda: load_checkpoint(nn.Linear(1, 1), str(path)),
    }
    for name, load in loaders.items():
        with pytest.raises(pickle.UnpicklingError, match=compat.TRUST_ENV):
            load()
        assert not marker.exists(), f'{name} ran the payload'


def test_the_crafted_pickle_is_real(tmp_path, untrusted):
    """The control for the test above: with the explicit opt-in, the same file does run its code."""
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'meta': exec_payload(marker)}, path)
    compat.trust_checkpoints()
    compat.load_checkpoint_file(str(path))
    assert marker.read_text() == 'pwned'


def test_a_crafted_pickle_behind_a_url_cannot_run_code(tmp_path, untrusted, monkeypatch):
    """http(s):// checkpoints (mmengine's load_url, torch.hub's cache) load with weights_only=True:
    the file is put where torch.hub caches the download, so nothing touches the network."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    marker = tmp_path / 'marker'
    torch.save({'meta': exec_payload(marker)}, cache / 'evil.pth')
    torch.save({'state_dict': {'w': torch.ones(1)}}, cache / 'plain.pth')

    ckpt = CheckpointLoader.load_checkpoint('https://example.invalid/models/plain.pth')
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(1))
    with pytest.raises(pickle.UnpicklingError, match=compat.TRUST_ENV):
        CheckpointLoader.load_checkpoint('https://example.invalid/models/evil.pth')
    assert not marker.exists()


def test_probing_keeps_globals_registered_before(untrusted):
    serialization = torch.serialization
    if not hasattr(serialization, 'get_safe_globals'):
        pytest.skip(f'torch {torch.__version__} has no torch.serialization.get_safe_globals: no '
                    'global allow-list to disturb')
    serialization.add_safe_globals([Opaque])
    try:
        safe_load._probe_allow_list()
        assert Opaque in serialization.get_safe_globals()
        if compat.torch_takes_allow_list():
            assert HistoryBuffer in serialization.get_safe_globals()
    finally:
        kept = [g for g in serialization.get_safe_globals() if g is not Opaque]
        serialization.clear_safe_globals()
        serialization.add_safe_globals(kept)


def test_missing_checkpoint_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='can not be found'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'nope.pth'))


def test_missing_pkg_resources_points_to_the_installer(monkeypatch):
    monkeypatch.setitem(__import__('sys').modules, 'pkg_resources', None)  # as if uninstalled
    with pytest.raises(ImportError, match='tools/install.sh'):
        compat.require_pkg_resources()


def test_state_dict_hooks_register_on_every_torch():
    """The helpers DAFTModel uses: a wrapper whose saved keys are its child's, and which loads them
    back (torch 2.1 has only the private registrations)."""
    calls = []

    def drop(module, state_dict, prefix, local_metadata):
        calls.append('save')
        for key in [k for k in state_dict if k.startswith(prefix + 'inner.')]:
            state_dict[prefix + key[len(prefix + 'inner.'):]] = state_dict.pop(key)

    def add(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        calls.append(('load', module.__class__.__name__))
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[prefix + 'inner.' + key[len(prefix):]] = state_dict.pop(key)

    wrapper = nn.Module()
    wrapper.inner = nn.Linear(2, 1)
    compat.register_state_dict_post_hook(wrapper, drop)
    compat.register_load_state_dict_pre_hook(wrapper, add)
    state = wrapper.state_dict()
    assert sorted(state) == ['bias', 'weight']
    other = nn.Module()
    other.inner = nn.Linear(2, 1)
    compat.register_load_state_dict_pre_hook(other, add)
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.inner.weight, wrapper.inner.weight)
    assert calls == ['save', ('load', 'Module')]


# ----------------------------------------- issue 32 item 8: every mmengine scheme, either torch
def _crafted(tmp_path: Path) -> tuple:
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': exec_payload(marker)}, path)
    return path, marker


def test_every_checkpoint_scheme_refuses_a_crafted_pickle(tmp_path, untrusted, monkeypatch):
    """pavi://, s3:// / petrel://, open-mmlab:// (a file in the mmengine home) and http(s)://:
    each scheme's own loader is fed the crafted file (its download or storage backend patched),
    and each refuses it, naming the global, without running it; on torch 2.1 too, where a bare
    torch.load would unpickle fully."""
    import sys
    import types

    from mmengine.runner import checkpoint as ckpt_mod
    from mmengine.runner.checkpoint import CheckpointLoader
    path, marker = _crafted(tmp_path)
    data = path.read_bytes()

    class Storage:  # what get_file_backend returns for s3:// (petrel)
        def get(self, filename):
            return data
    monkeypatch.setattr(ckpt_mod, 'get_file_backend', lambda *a, **k: Storage())

    class CloudModel:  # pavi's modelcloud entry
        name = 'evil.pth'

        def download(self, target):
            Path(target).write_bytes(data)
    pavi = types.ModuleType('pavi')
    pavi.modelcloud = types.SimpleNamespace(get=lambda name: CloudModel())
    monkeypatch.setitem(sys.modules, 'pavi', pavi)
    monkeypatch.setattr(ckpt_mod, '_get_mmengine_home', lambda: str(tmp_path))
    monkeypatch.setattr(ckpt_mod, 'get_external_models', lambda: {'evil': 'evil.pth'})
    hub = tmp_path / 'hub'
    hub.mkdir()
    (hub / 'evil.pth').write_bytes(data)  # a finished download in the cache: no network
    loaders = {
        's3://bucket/evil.pth': lambda f: CheckpointLoader.load_checkpoint(f),
        'petrel://bucket/evil.pth': lambda f: CheckpointLoader.load_checkpoint(f),
        'pavi://models/evil': lambda f: CheckpointLoader.load_checkpoint(f),
        'open-mmlab://evil': lambda f: CheckpointLoader.load_checkpoint(f),
        'https://example.invalid/evil.pth':
            lambda f: ckpt_mod.load_from_http(f, model_dir=str(hub)),
    }
    for url, load in loaders.items():
        with pytest.raises(pickle.UnpicklingError, match=r'the global `builtins\.exec`'):
            load(url)
        assert not marker.exists(), url
    compat.trust_checkpoints(True)  # the opt-in still loads it (and runs it: it is trusted)
    CheckpointLoader.load_checkpoint('s3://bucket/evil.pth')
    assert marker.exists()
