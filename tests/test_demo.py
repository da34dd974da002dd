"""The README's main-job command, ``tools/demo.py --quick``, end to end (the slowest test), and the
demo's pieces that need no training."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import pytest

from _tools import load_tool

REPO = Path(__file__).resolve().parents[1]
METHODS = ('FT', 'LP', 'LP-FT', 'DAFT')


def _demo():
    return load_tool('demo')


def _finite_stat(stat: dict) -> bool:
    return all(math.isfinite(stat[k]) for k in ('mean', 'std')) and len(stat['values']) >= 1


def test_demo_quick_end_to_end(tmp_path, python):
    work = tmp_path / 'demo'
    proc = subprocess.run([python, str(REPO / 'tools' / 'demo.py'), '--quick', '--work-dir',
                           str(work)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / 'report.json').read_text())
    assert set(report['methods']) == set(METHODS)
    ood = report['ood_sets']
    assert {'night', 'haze', 'sunset'} <= set(ood) and any('gaussian_noise' in n for n in ood)
    for method in METHODS:
        m = report['methods'][method]
        assert _finite_stat(m['id_miou']) and _finite_stat(m['ood_mean_miou'])
        assert _finite_stat(m['cosine_similarity'])
        assert all(_finite_stat(m['ood_miou'][name]) for name in ood)
        assert 0.0 <= m['id_miou']['mean'] <= 100.0
    # LP freezes the backbone with BN in eval mode: its features are the pretrained ones.
    assert report['methods']['LP']['cosine_similarity']['mean'] == pytest.approx(1.0, abs=1e-6)
    assert report['learning_rates_source'].startswith(str(REPO / 'configs' / 'demo'))
    md = (work / 'report.md').read_text()
    assert all(f'| {m} |' in md for m in METHODS)
    # a one-seed --quick run says so, and shows no made-up spread
    assert '--quick' in md.splitlines()[0] and '1 seed' in md.splitlines()[0] and '±' not in md
    assert (work / 'report.png').stat().st_size > 1000
    # The pretrained model is cached under a key of the settings, for the next run to reuse.
    assert len(list((work / 'pretrain').glob('*/pretrained.pth'))) == 1
    assert 'pretraining: done' in proc.stdout


def test_recorded_lrs_cover_every_method():
    demo = _demo()
    lrs, source = demo.recorded_lrs(demo.RECORDED_LRS)
    assert set(lrs) == set(METHODS) and all(lr > 0 for lr in lrs.values())
    assert 'recorded_lrs.json' in source


def test_missing_recorded_lrs_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match='--sweep'):
        _demo().recorded_lrs(tmp_path / 'none.json')


def test_cache_keys_follow_the_settings():
    demo = _demo()
    assert demo.DEFAULT.data_key() != demo.QUICK.data_key()
    changed = dataclasses.replace(demo.DEFAULT, pretrain_iters=1)
    assert changed.data_key() == demo.DEFAULT.data_key()
    assert changed.pretrain_key() != demo.DEFAULT.pretrain_key()


def test_summary_mean_and_sample_std():
    demo = _demo()
    runs = {'FT': [dict(id=10.0, ood={'a': 1.0}, ood_mean=1.0, cosine=0.5, cosine_pooled=0.9),
                   dict(id=14.0, ood={'a': 3.0}, ood_mean=3.0, cosine=0.7, cosine_pooled=0.9)]}
    s = demo.summarize(runs, ['a'])['FT']
    assert s['id_miou']['mean'] == 12.0
    assert s['id_miou']['std'] == pytest.approx(math.sqrt(8.0))
    assert s['ood_miou']['a']['values'] == [1.0, 3.0]
    one = demo.summarize({'FT': runs['FT'][:1]}, ['a'])['FT']
    assert one['id_miou']['std'] == 0.0
