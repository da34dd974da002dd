"""The comparison's search at the budget people train at (issue 28): successive halving on ID-val
(pure logic, no training), a promoted trial continued from its rung checkpoint (real Runner), and
the trials on Ray Tune: a local Ray, a Ray head started on localhost and joined by address,
failing trials, and the start-up errors of an unreachable address or an unplaceable trial."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from daft_mm.benchmark.methods import Point
from daft_mm.benchmark.selection import (Axis, Trial, drive, halving_cost, halving_rungs,
                                         search_steps)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ successive halving (logic)
def _bowl(best_lr: float):
    """ID-val rising with the iterations, peaked at ``best_lr`` in log space."""
    def score(p: Point, seed: int, iters: int) -> float:
        return 50.0 - 5.0 * math.log10(p.lr / best_lr) ** 2 + 0.01 * seed + iters / 100.0
    return score


def _run(steps, score) -> tuple:
    seen: List[Trial] = []

    def run(trials: List[Trial]) -> List[float]:
        seen.extend(trials)
        return [score(t.point, t.seed, t.iters) for t in trials]
    return drive(steps, run), seen


def test_halving_rungs_are_fractions_of_the_budget():
    assert halving_rungs(300) == (33, 100, 300)
    assert halving_rungs(300, eta=2, rungs=4) == (37, 75, 150, 300)
    assert halving_rungs(4) == (1, 4)  # a tiny budget has fewer rungs
    with pytest.raises(ValueError, match='reduction factor'):
        halving_rungs(300, eta=1)


def test_halving_promotes_the_best_third_and_continues_from_the_rung():
    axes = [Axis('lr', (1e-4, 1e-3, 1e-2)), Axis('ratio', (10.0, 100.0, 1000.0))]
    result, seen = _run(search_steps(axes, seeds=(0, 1, 2), rungs=(33, 100, 300)), _bowl(1e-3))
    assert result.chosen.lr == pytest.approx(1e-3)
    first = [t for t in seen if t.seed == 0]
    assert sum(t.iters == 33 for t in first) == 9
    assert sum(t.iters == 100 for t in first) == 3 and sum(t.iters == 300 for t in first) == 2
    # every continuation starts where the point stopped, never from scratch
    assert all(t.start == {33: 0, 100: 33, 300: 100}[t.iters] for t in first)
    # the finalists' other seeds train the whole budget; a finalist below the top is continued
    assert {t.iters for t in seen if t.seed > 0} == {300}
    assert result.iterations['grid'] == 9 * 33 + 3 * 67 + 1 * 200
    grid = result.to_dict()['grid']
    assert sum('stopped_at' in g for g in grid) == 7  # two reached the budget (the finalists)
    full = 9 * 300
    assert result.iterations['grid'] / full <= 1 / 3


def test_halving_cost_matches_a_search_that_does_not_widen():
    axes = [Axis('lr', tuple(10.0 ** -k for k in range(2, 8)))]  # fixed: no step, no widening
    for rungs in ((33, 100, 300), (300, )):
        result, _ = _run(search_steps(axes, seeds=(0, 1, 2), rungs=rungs), _bowl(1e-4))
        cost = halving_cost(6, rungs, seeds=3)
        assert cost['grid'] == result.iterations['grid']
        assert cost['finalists'] == result.iterations['finalists']


def test_a_widened_point_enters_at_the_first_rung_and_can_take_the_lead():
    result, seen = _run(search_steps([Axis('lr', (1e-2, 1e-1), step=10.0)], seeds=(0, ),
                                     rungs=(10, 30, 90)), _bowl(1e-4))
    assert result.chosen.lr == pytest.approx(1e-4) and not result.on_edge
    assert all(t.iters == 10 for t in seen if t.start == 0)  # every point starts at rung one
    assert any(t.point.lr == pytest.approx(1e-4) for t in seen if t.iters == 90)


def test_a_failed_or_diverged_trial_is_never_continued_nor_chosen():
    def score(p: Point, seed: int, iters: int) -> float:
        if p.lr == 1.0:
            return math.nan  # raised or diverged at once
        if p.lr == 0.3 and iters > 10:
            return math.nan  # best at the first rung, diverges later
        return {0.3: 90.0, 0.1: 60.0, 0.03: 50.0, 0.01: 40.0}[p.lr] + iters / 100
    result, seen = _run(search_steps([Axis('lr', (0.01, 0.03, 0.1, 0.3, 1.0))], seeds=(0, 1),
                                     rungs=(10, 30, 90)), score)
    assert result.chosen == Point(lr=0.1)
    assert not any(t.point.lr == 1.0 and t.start for t in seen)  # NaN: never continued
    # 0.3 failed at rung two: its place there goes to the next best, which reaches the top
    assert Trial(Point(lr=0.1), 0, 30, 10) in seen


def test_the_choice_does_not_depend_on_the_order_trials_finish():
    """The rule reads scores only: a driver that answers a batch in any order (as Ray does,
    results are put back in order) gets the same trials and the same choice."""
    axes = [Axis('lr', (1e-4, 1e-3, 1e-2, 1e-1))]
    a, seen_a = _run(search_steps(axes, seeds=(0, 1), rungs=(5, 15, 45)), _bowl(1e-2))

    def reversed_run(trials):
        out = [None] * len(trials)
        for i in reversed(range(len(trials))):
            t = trials[i]
            out[i] = _bowl(1e-2)(t.point, t.seed, t.iters)
        return out
    b = drive(search_steps(axes, seeds=(0, 1), rungs=(5, 15, 45)), reversed_run)
    assert a.chosen == b.chosen and a.to_dict() == b.to_dict()


# ------------------------------------------------------------------ trials (real Runner)
pytest.importorskip('mmseg')
pytest.importorskip('ray.tune')

SAMPLE = REPO / 'tests' / 'samples' / 'camvid' / 'CamVid'
CAMVID_SPEC = REPO / 'configs' / 'camvid' / 'compare_camvid_day_dusk.py'


def _task(camvid_root: Path, budget: int = 6, **overrides):
    from daft_mm.benchmark.task import task_from_config
    return task_from_config(str(CAMVID_SPEC), options={'data_root': str(camvid_root)},
                            budget=budget, max_images=4, seeds=(0, ),
                            **{'spaces': 'quick', **overrides})


def _context(task, work: Path):
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401
    from daft_mm.benchmark.runs import Context, load_pretrained
    init_default_scope('mmseg')
    ctx = Context(task=task, work_dir=work, step=print, task_key=task.key())
    load_pretrained(ctx)
    return ctx


def test_lr_scale_moves_every_lr_grid_and_leaves_the_task_key(camvid_root):
    """A detection task's grids sit lower than segmentation's: every 'lr' axis times the
    task's ``lr_scale`` (the other axes and the widening step as they were). The task key leaves
    it out: a run's key holds its own LR, so a run that two grids share is trained once."""
    from daft_mm.benchmark.experiment import SEARCH_SPACES, _space
    from daft_mm.benchmark.methods import get_method
    axes = _space(get_method('DAFT'), SEARCH_SPACES, {}, 0.125)
    assert [(a.name, a.values, a.step) for a in axes] == [
        ('lr', (0.000125, 0.00125, 0.0125), 10.0), ('ratio', (10.0, 100.0, 1000.0), 10.0),
        ('scope', ('new_modules', ), None)]
    assert _space(get_method('FT'), SEARCH_SPACES, {}, 0.125)[0].values[:3] == (
        0.00125, 0.0025, 0.005)
    task = _task(camvid_root)
    assert task.lr_scale == 1.0
    assert _task(camvid_root, lr_scale=0.5).key() == task.key()
    with pytest.raises(ValueError, match='lr_scale must be > 0'):
        _task(camvid_root, lr_scale=0)


def test_a_task_may_place_a_methods_grid_and_a_wrong_axis_is_refused(camvid_root, tmp_path):
    """A task's ``grids`` replace a method's starting axes as given (``lr_scale`` does not touch
    them; the other axes and the widening steps stay), for the search only (``--quick`` keeps its
    one point), and leave the task key; a method or axis the comparison lacks is refused."""
    from daft_mm.benchmark.experiment import SEARCH_SPACES, _grids, _space
    from daft_mm.benchmark.methods import get_method
    from daft_mm.benchmark.task import InputError
    task = _task(camvid_root, lr_scale=0.5, grids={'daft': dict(lr=[4e-5, 4e-4, 4e-3])},
                 spaces='default')
    assert task.grids == {'DAFT': {'lr': (4e-5, 4e-4, 4e-3)}}
    axes = _space(get_method('DAFT'), SEARCH_SPACES, {}, task.lr_scale, _grids(task))
    assert [(a.name, a.values, a.step) for a in axes] == [
        ('lr', (4e-5, 4e-4, 4e-3), 10.0), ('ratio', (10.0, 100.0, 1000.0), 10.0),
        ('scope', ('new_modules', ), None)]
    assert _space(get_method('FT'), SEARCH_SPACES, {}, task.lr_scale,
                  _grids(task))[0].values[0] == 0.005  # 0.01 x 0.5
    assert _grids(_task(camvid_root, grids={'DAFT': dict(lr=(4e-5, ))})) == {}  # --quick
    assert task.key() == _task(camvid_root, spaces='default').key()
    # set in a config's compare dict (where users set them), they leave the key too
    config = tmp_path / 'placed.py'
    config.write_text(f'_base_ = [{str(CAMVID_SPEC)!r}]\n'
                      "compare = dict(lr_scale=0.5, grids={'DAFT': dict(lr=(4e-5, ))}, "
                      f"backbone={str(task.backbone)!r})\n")
    from daft_mm.benchmark.task import task_from_config
    placed = task_from_config(str(config), options={'data_root': str(camvid_root)}, budget=6,
                              max_images=4, seeds=(0, ), spaces='default')
    assert placed.grids == {'DAFT': {'lr': (4e-5, )}} and placed.key() == task.key()
    with pytest.raises(InputError, match="DAFT has no axis 'lrs'.*lr, ratio, scope"):
        _grids(_task(camvid_root, grids={'DAFT': dict(lrs=(0.1, ))}, spaces='default'))
    with pytest.raises(InputError, match='WiSE-FT is not searched'):
        _grids(_task(camvid_root, grids={'wise-ft': dict(alpha=(0.5, ))}, spaces='default'))
    with pytest.raises(ValueError, match="grids: .*'DFAT'"):
        _task(camvid_root, grids={'DFAT': dict(lr=(0.1, ))})
    with pytest.raises(ValueError, match='FT lr has no values'):
        _task(camvid_root, grids={'FT': dict(lr=())})


@pytest.mark.parametrize('method, point', [
    ('DAFT', Point(lr=0.01, ratio=10.0, scope='new_modules')),
    ('LP-FT', Point(lr=0.1))])
def test_a_promoted_trial_ends_with_the_numbers_of_an_uninterrupted_run(camvid_root, tmp_path,
                                                                        method, point):
    from daft_mm.benchmark.runs import Job, run_trial
    task = _task(camvid_root)
    probe = Point(lr=0.3) if method == 'LP-FT' else None
    length = 3 if method == 'LP-FT' else 6  # LP-FT's rungs are of its FT stage
    ctx = _context(task, tmp_path / 'halved')
    rung = run_trial(ctx, Job(method, point, 0, iters=1, probe=probe))
    assert set(rung) >= {'id_val', 'iters'} and 'ood' not in rung  # a rung: ID-val only
    work = next((tmp_path / 'halved' / 'runs' / method.replace(' ', '_')).iterdir())
    assert (work / 'rung_1.pth').is_file()
    rung2 = run_trial(ctx, Job(method, point, 0, iters=2, start=1, probe=probe))
    assert rung2['iterations'] == 1 and not (work / 'rung_1.pth').exists()
    done = run_trial(ctx, Job(method, point, 0, start=2, probe=probe))
    assert done['iterations'] == length - 2 and not list(work.glob('rung_*.pth'))
    fresh = run_trial(_context(task, tmp_path / 'straight'), Job(method, point, 0, probe=probe))
    assert (done['id_val'], done['id'], done['ood'], done['cosine']) == \
        (fresh['id_val'], fresh['id'], fresh['ood'], fresh['cosine'])
    # and the cache answers the finished trial without training
    again = run_trial(ctx, Job(method, point, 0, start=2, probe=probe))
    assert again['reused'] and again['iterations'] == 0 and again['id'] == done['id']


# ------------------------------------------------------------------ Ray
def _compare(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / 'tools' / 'compare.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_failing_trials_are_reported_and_never_chosen(camvid_root, tmp_path, monkeypatch):
    """One setting raises (a negative LR, refused by the optimizer), one diverges (a loss that
    turns NaN); the other trials finish, the choice is the setting that trained, and the report
    lists both failures with their errors."""
    from daft_mm.benchmark import experiment
    spaces = dict(experiment.QUICK_SEARCH_SPACES, FT=[Axis('lr', (0.1, -0.1, 1e6))])
    monkeypatch.setattr(experiment, 'QUICK_SEARCH_SPACES', spaces)
    task = _task(camvid_root, budget=4)
    opts = experiment.Options(quick=True, search=True, work_dir=str(tmp_path / 'work'),
                              halving=None, command='tools/compare.py')
    report = experiment.run_comparison(task, opts)
    assert report['chosen']['FT'] == {'lr': 0.1}
    failed = {f['trial']: f['error'] for f in report['failed_trials']}
    assert any('lr=-0.1' in t and 'learning rate' in e for t, e in failed.items()), failed
    assert any('lr=1e+06' in t and 'diverges' in e for t, e in failed.items()), failed
    assert all(len(report['runs'][m]) == 1 for m in report['runs'])  # every row trained
    assert report['cost']['per_method']['FT']['grid_points'] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_comparison_on_a_ray_head_started_on_localhost(camvid_root, tmp_path):
    """`ray start --head` on 127.0.0.1 (blocking, so stopping it stops this head only), a tiny
    comparison joined with --address, then the head is stopped."""
    ray = Path(sys.executable).with_name('ray')
    port = _free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED='0', RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER='0')
    head = subprocess.Popen([str(ray), 'start', '--head', '--block', '--node-ip-address',
                             '127.0.0.1', '--port', str(port), '--num-cpus', '2',
                             '--include-dashboard=false', '--disable-usage-stats'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, head.stdout.read()
                time.sleep(0.5)
        proc = _compare(CAMVID_SPEC, '--quick', '--search', '--address', f'127.0.0.1:{port}',
                        '--no-budget-check', '--work-dir', tmp_path / 'work',
                        '--cfg-options', f'data_root={camvid_root}')
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f'the Ray cluster at 127.0.0.1:{port}' in proc.stdout
        assert (tmp_path / 'work' / 'report.json').is_file()
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


def test_an_unreachable_address_is_an_error_at_once(tmp_path):
    t0 = time.time()
    proc = _compare(CAMVID_SPEC, '--quick', '--search', '--address', f'127.0.0.1:{_free_port()}',
                    '--work-dir', tmp_path, '--cfg-options', f'data_root={SAMPLE}',
                    timeout=120)
    assert proc.returncode == 2 and 'no Ray cluster answers at 127.0.0.1' in proc.stderr
    assert 'ray start --head' in proc.stderr and time.time() - t0 < 60
    proc = _compare(CAMVID_SPEC, '--quick', '--search', '--address', 'nohost',
                    '--work-dir', tmp_path, timeout=120)
    assert proc.returncode == 2 and 'give HOST:PORT' in proc.stderr


def test_a_trial_no_node_can_place_is_an_error_at_start_up(camvid_root, tmp_path):
    proc = _compare(CAMVID_SPEC, '--quick', '--search', '--gpus-per-trial', '2',
                    '--work-dir', tmp_path, '--cfg-options', f'data_root={camvid_root}',
                    timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'a trial asks for 1 CPU and 2 GPU' in proc.stderr
    assert '--gpus-per-trial' in proc.stderr and 'Traceback' not in proc.stderr


def test_ctrl_c_stops_the_trials_at_once_and_a_rerun_continues(camvid_root, tmp_path):
    """SIGINT while trials train: the comparison and its local Ray end within seconds, saying
    where the finished trials are; the same command then reuses them."""
    import signal
    work = tmp_path / 'work'
    cmd = [sys.executable, str(REPO / 'tools' / 'compare.py'), str(CAMVID_SPEC), '--quick',
           '--search', '--budget', '30', '--no-budget-check', '--work-dir', str(work),
           '--cfg-options', f'data_root={camvid_root}']
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not list(work.glob('runs/*/*/rung_*.json')) and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        t0 = time.time()
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130 and time.time() - t0 < 30, err[-2000:]
    assert f'Finished trials are kept in {work}' in err
    cached = len(list(work.glob('runs/*/*/rung_*.json')))
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.count('(reused)') >= cached >= 1
