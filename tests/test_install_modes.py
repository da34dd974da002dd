"""Install mode (b): tools/check_env.py says exactly what is missing / too old / too new / broken,
and setup.py never asks pip for torch or mmcv."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
check_env = runpy.run_path(str(REPO / 'tools' / 'check_env.py'))
VERSIONS = runpy.run_path(str(REPO / 'daft_mm' / '_versions.py'))


def fake_torch(version: str, cuda: str | None, gpu: bool = False) -> SimpleNamespace:
    return SimpleNamespace(__version__=version, version=SimpleNamespace(cuda=cuda),
                           cuda=SimpleNamespace(is_available=lambda: gpu))


@pytest.mark.parametrize('found, state', [
    (None, 'MISSING'), ('2.0.1', 'TOO OLD'), ('2.1.2+cu121', 'ok'), ('2.13.0+cpu', 'ok'),
    ('2.14.0', 'TOO NEW'), ('3.0.0', 'TOO NEW')])
def test_torch_versions_are_placed_against_the_tested_range(found, state):
    finding = check_env['compare']('torch', found, VERSIONS['TORCH'], 'the fix')
    assert finding.state == state
    assert (finding.fix == 'the fix') == (state != 'ok')


def test_too_new_numpy_and_mmcv_name_the_range():
    numpy = check_env['compare']('numpy', '2.1.0', '>=1.26,<2', 'pip install "numpy>=1.26,<2"')
    assert numpy.state == 'TOO NEW' and '<2' in numpy.line() and 'pip install' in numpy.line()
    mmcv = check_env['compare']('mmcv', '2.2.0', VERSIONS['MMCV'], 'x')
    assert mmcv.state == 'TOO NEW'


@pytest.mark.parametrize('torch, expected', [
    (fake_torch('2.1.2+cu121', '12.1'), 'download.openmmlab.com/mmcv/dist/cu121/torch2.1'),
    (fake_torch('2.1.0+cu118', '11.8'), 'download.openmmlab.com/mmcv/dist/cu118/torch2.1'),
    (fake_torch('2.1.2+cpu', None), 'download.openmmlab.com/mmcv/dist/cpu/torch2.1'),
    (fake_torch('2.13.0+cu128', '12.8'), 'FORCE_CUDA=1'),
    (fake_torch('2.13.0+cpu', None), 'FORCE_CUDA=0'),
    (fake_torch('2.1.2+cu117', '11.7'), 'FORCE_CUDA=1'),  # no prebuilt mmcv 2.1.0 for cu117
])
def test_the_mmcv_advice_matches_torch_and_cuda(torch, expected):
    assert expected in check_env['mmcv_install_command'](torch)


def test_mmcv_without_ops_or_built_for_another_torch_is_broken(monkeypatch):
    torch = fake_torch('2.1.2+cu121', '12.1')
    monkeypatch.setitem(check_env['mmcv_finding'].__globals__, 'installed',
                        lambda dist: '2.1.0' if dist == 'mmcv' else None)

    def no_ext():
        raise ModuleNotFoundError("No module named 'mmcv._ext'")

    def wrong_torch():
        raise ImportError('mmcv/_ext.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c10')

    cpu_ops = SimpleNamespace(get_compiling_cuda_version=lambda: 'not available')
    finding = check_env['mmcv_finding'](torch, no_ext)
    assert finding.state == 'BROKEN' and 'without its compiled ops' in finding.fix
    finding = check_env['mmcv_finding'](torch, wrong_torch)
    assert finding.state == 'BROKEN' and 'do not load with torch 2.1.2' in finding.fix
    assert check_env['mmcv_finding'](torch, lambda: cpu_ops).ok  # no GPU: CPU ops are enough
    gpu = fake_torch('2.1.2+cu121', '12.1', gpu=True)
    finding = check_env['mmcv_finding'](gpu, lambda: cpu_ops)
    assert finding.state == 'BROKEN' and 'without CUDA ops' in finding.fix


def test_this_environment_passes_the_check():
    """Each CI lane is a tested combination, so the checker must find nothing to fix in it."""
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'check_env.py')],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'all tested versions found' in proc.stdout


def test_pip_install_never_asks_for_torch_or_mmcv():
    names = {r.split('>')[0].split('<')[0].split('=')[0].strip().lower() for r in VERSIONS['RUNTIME']}
    assert not names & {'torch', 'torchvision', 'mmcv', 'mmcv-full', 'mmcv-lite'}
    assert {'mmengine', 'mmsegmentation', 'mmdet', 'numpy'} <= names
    setup_py = (REPO / 'setup.py').read_text()
    assert "install_requires=versions['RUNTIME']" in setup_py


def test_python_requires_is_what_ci_runs():
    from packaging.specifiers import SpecifierSet
    assert '.'.join(map(str, sys.version_info[:3])) in SpecifierSet(VERSIONS['PYTHON'])
    assert '3.12.0' not in SpecifierSet(VERSIONS['PYTHON'])  # not tested: not declared
