"""The README's main-job command, ``tools/demo.py``, end to end on the reduced ``--quick`` data:
a search on ID-val, then the default mode on the recorded choice (every run reused), and the
report's promises (fresh heads, equal budgets, ablation rows, search grid, Pareto figure)."""
from __future__ import annotations

import dataclasses
import json
import re
import math
import subprocess
from pathlib import Path

import pytest

from _mm_helpers import cpu_env

REPO = Path(__file__).resolve().parents[1]
ROWS = ('FT', 'LP', 'LP-FT', 'DAFT', 'DAFT w/o conversion', 'conversion only')


def _finite(stat: dict) -> bool:
    return all(math.isfinite(stat[k]) for k in ('mean', 'std')) and len(stat['values']) >= 1


@pytest.fixture(scope='module')
def searched(tmp_path_factory, python):
    """``--quick --search`` on a local Ray, two trials at once (one per core)."""
    work = tmp_path_factory.mktemp('demo')
    proc = subprocess.run([python, str(REPO / 'tools' / 'demo.py'), '--quick', '--search',
                           '--work-dir', str(work)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def test_search_report_has_every_row_fresh_heads_and_equal_budgets(searched):
    work, out = searched
    report = json.loads((work / 'report.json').read_text())
    assert tuple(report['methods']) == ROWS
    assert {'DAFT', 'DAFT w/o conversion', 'conversion only'} == set(report['ablations'])
    budget = report['budget_iterations']
    for name, runs in report['runs'].items():
        for run in runs:
            assert sum(run['budgets'].values()) == budget, (name, run['budgets'])
            assert 0.0 <= run['id'] <= 100.0 and run['id_val'] >= 0.0
    assert report['runs']['LP-FT'][0]['budgets'] == {'lp': 2, 'ft': 2}
    for m in report['methods'].values():
        assert _finite(m['id_miou']) and _finite(m['ood_mean_miou'])
        assert _finite(m['cosine_similarity'])
    # LP freezes the backbone with BN in eval mode: its features are the pretrained ones.
    assert report['methods']['LP']['cosine_similarity']['mean'] == pytest.approx(1.0, abs=1e-6)
    # --quick searches one setting per method (a smoke test; the scope axis of the full grid is
    # tested in tests/test_benchmark.py); every grid point has its ID-val score
    grid = report['search']['DAFT']['grid']
    assert [g['scope'] for g in grid] == ['new_modules']
    assert all('id_val' in g for g in grid) and report['search_runs']
    # the pretrained checkpoint holds a backbone only: every method's decode head is new
    import torch
    saved = torch.load(report['backbone_checkpoint'], weights_only=True)
    assert saved['state_dict'] and all(k.startswith('backbone.') for k in saved['state_dict'])
    assert saved['meta']['source_classes'][0] == 'flat'
    md = (work / 'report.md').read_text()
    assert all(f'| {m} |' in md for m in ROWS)
    assert '--quick' in md.splitlines()[0] and '1 seed' in md.splitlines()[0] and '±' not in md
    assert (work / 'report.png').stat().st_size > 1000
    assert re.search(r'\d+ trial\(s\) at once on a local Ray on 127\.0\.0\.1', out)
    assert 'pretraining: ' in out


def test_default_mode_reads_the_recorded_choice_and_reuses_finished_runs(searched, python):
    work, _ = searched
    proc = subprocess.run([python, str(REPO / 'tools' / 'demo.py'), '--quick', '--concurrent-trials', '1',
                           '--recorded', str(work / 'search.json'), '--work-dir', str(work)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / 'report.json').read_text())
    assert report['trained_runs'] == 0 and proc.stdout.count('reused') == len(ROWS)
    assert report['chosen_source'].startswith(str(work / 'search.json'))
    assert 'pretraining: reusing' in proc.stdout


def test_shipped_recorded_choice_covers_every_row():
    from daft_mm.benchmark.experiment import RECORDED, load_recorded
    rec = load_recorded(RECORDED)
    assert set(rec['chosen']) == set(ROWS)
    assert rec['search']['DAFT']['grid'] and rec['runs']


def test_missing_recorded_choice_says_how_to_make_it(tmp_path):
    from daft_mm.benchmark.experiment import load_recorded
    from daft_mm.benchmark.task import InputError
    with pytest.raises(InputError, match='--search'):
        load_recorded(tmp_path / 'none.json')


def test_cache_keys_follow_the_settings():
    from daft_mm.benchmark.data import DEFAULT, QUICK
    assert DEFAULT.data_key() != QUICK.data_key()
    changed = dataclasses.replace(DEFAULT, pretrain_iters=1)
    assert changed.data_key() == DEFAULT.data_key()
    assert changed.pretrain_key() != DEFAULT.pretrain_key()
    # the fine-tuning budget is not part of pretraining: a new budget reuses the backbone
    assert dataclasses.replace(DEFAULT, budget=1).pretrain_key() == DEFAULT.pretrain_key()


def test_report_says_quick_and_single_seed(tmp_path):
    from daft_mm.benchmark.report import markdown_table, plot_report, report_title, summarize
    run = dict(id_val=50.0, id=55.0, ood={'night': 40.0}, ood_mean=40.0, cosine=0.9,
               cosine_pooled=0.95)
    summary = summarize({'FT': [run], 'DAFT': [dict(run, ood_mean=42.0)]}, ['night'])
    table = markdown_table(summary, ['night'], {'DAFT': 'lr=0.01 ratio=100'})
    assert '±' not in table
    # one OOD set: no OOD-mean column repeating it
    assert '| DAFT | lr=0.01 ratio=100 | 50.00 | 55.00 | 40.00 | 0.9000 |' in table
    both = summarize({'DAFT': [dict(run, ood={'night': 40.0, 'fog': 44.0}, ood_mean=42.0)]},
                     ['night', 'fog'])
    assert '| DAFT |  | 50.00 | 55.00 | 40.00 | 44.00 | 42.00 | 0.9000 |' in markdown_table(
        both, ['night', 'fog'], {})
    title = report_title(quick=True, n_seeds=1)
    assert '--quick' in title and '1 seed, no spread' in title
    assert 'mean ± std over 3 seeds' in report_title(quick=False, n_seeds=3)
    two = summarize({'FT': [run, dict(run, id=57.0)]}, ['night'])
    assert '56.00 ± 1.41' in markdown_table(two, ['night'], {})
    search_runs = [dict(method='FT', setting={'lr': lr}, id=i, ood_mean=o)
                   for lr, i, o in ((0.1, 50, 30), (0.3, 55, 28))]
    plot_report(summary, search_runs, tmp_path / 'r.png', title)
    assert (tmp_path / 'r.png').stat().st_size > 1000
