"""The comparison of methods on one task, end to end: each method at its setting chosen on ID-val
(recorded, or searched now), the ablations, the check that the budget suffices, and the report.
:func:`run_comparison` runs any :class:`~daft_mm.benchmark.task.TaskSpec` (``tools/compare.py``);
:func:`run_benchmark` is the embedded demo (``tools/demo.py``): its data and backbone, then the
same.

Every method: the same pretrained backbone, a fresh decode head (or neck and heads), the same
iteration budget, the same seeds; every choice on ID-val only (OOD sets are evaluated, never
used to choose).
"""
from __future__ import annotations

import json
import math
import os.path as osp
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Generator, List, Mapping, Optional, Sequence, Tuple

from daft_mm.utils import atomic_write, atomic_write_json

from .data import DEFAULT, QUICK, repo_commit
from .demo_task import DEMO_CONFIGS, demo_task
from .methods import (ABLATIONS, AT_DAFT, MethodSpec, Point, describe, get_method,
                      selected_methods, stage_budgets)
from .report import (block_bootstrap, bootstrap_lines, front_lines, markdown_table,
                     paired_differences, paired_lines, per_class_iou, per_class_lines,
                     plot_report, report_title, stat, summarize, verdict_line)
from .runs import Context, Job, cached_result, code_hash, load_pretrained, load_run_config
from .scoring import METRIC_NAMES, SCOPES
from .selection import Axis, SearchResult, halving_cost, halving_rungs, search_steps
from .engine import RayCluster, Resources, run_trials
from .task import InputError, TaskSpec, check_data, provenance

__all__ = ['RECORDED', 'SEARCH_SPACES', 'QUICK_SEARCH_SPACES', 'Progress', 'Options',
           'run_benchmark', 'run_comparison', 'load_recorded', 'write_report', 'attach_floor']

#: The choices ``--search`` made on ID-val, with every search run (for the Pareto plot).
RECORDED = DEMO_CONFIGS / 'recorded_search.json'
#: Starting grids (widened by the search while the best point is at an edge): 9 points for every
#: method, so no method is favoured by a finer search (one axis: 9 LRs a factor 2 apart; two
#: axes: 3 x 3). DAFT's head LR is lr x ratio: the diagonal lr=1e-2/ratio=1e2, 1e-3/1e3 keeps the
#: head near LP's LR while the backbone slows down, the regime the paper's ratios (1e3-3e6) point
#: to; its head is the recipe's (every new module; `predictors` was never chosen on CamVid). The
#: ratio stops at 1: below it the head trains slower than the backbone, which is not DAFT's
#: integrated LP+FT (the first search, before this floor, tried 0.1 once: it lost to 1).
_LRS = tuple(0.01 * 2 ** k for k in range(9))  # 0.01 .. 2.56
SEARCH_SPACES: Dict[str, List[Axis]] = {
    'LP': [Axis('lr', tuple(2 * lr for lr in _LRS), step=2.0)],
    'FT': [Axis('lr', _LRS, step=2.0)],
    'LP-FT': [Axis('lr', _LRS, step=2.0)],
    'DAFT': [Axis('lr', (0.001, 0.01, 0.1), step=10.0),
             Axis('ratio', (10.0, 100.0, 1000.0), step=10.0, floor=1.0),
             Axis('scope', ('new_modules', ))],
    'DAFT w/o conversion': [Axis('lr', (0.001, 0.01, 0.1), step=10.0),
                            Axis('ratio', (10.0, 100.0, 1000.0), step=10.0, floor=1.0)],
    'conversion only': [Axis('lr', _LRS, step=2.0)],
    'FT, head at 10x': [Axis('lr', _LRS, step=2.0)],
    'L2-SP': [Axis('lr', (0.03, 0.1, 0.3), step=3.0),
              Axis('strength', (0.01, 0.1, 1.0), step=10.0)],
}
#: --quick: one point per method (a smoke test of the whole path, not a search).
QUICK_SEARCH_SPACES: Dict[str, List[Axis]] = {
    'LP': [Axis('lr', (0.3, ))], 'FT': [Axis('lr', (0.1, ))], 'LP-FT': [Axis('lr', (0.1, ))],
    'DAFT': [Axis('lr', (0.01, )), Axis('ratio', (10.0, )), Axis('scope', ('new_modules', ))],
    'DAFT w/o conversion': [Axis('lr', (0.01, )), Axis('ratio', (10.0, ))],
    'conversion only': [Axis('lr', (0.1, ))],
    'FT, head at 10x': [Axis('lr', (0.1, ))],
    'L2-SP': [Axis('lr', (0.1, )), Axis('strength', (0.1, ))],
}
#: Searched in this order: LP-FT's probe stage is LP at LP's choice; the DAFT ablation without
#: conversion uses DAFT's head scope.
ORDER = ('LP', 'FT', 'LP-FT', 'DAFT', 'DAFT w/o conversion', 'conversion only',
         'FT, head at 10x', 'L2-SP')
#: Independent chains of that order, searched side by side.
CHAINS = (('LP', 'LP-FT'), ('DAFT', 'DAFT w/o conversion'), ('FT', 'conversion only'),
          ('FT, head at 10x', ), ('L2-SP', ))


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f'{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}' if s >= 3600 else \
        f'{s // 60:d}:{s % 60:02d}'


class Progress:
    """One line per finished trial: trials done of those expected, elapsed time, the time left
    (from the iterations trained so far and those still expected) and what finished; on a
    terminal also one live line (trials running, stopped early, finished, failed; the best
    ID-val so far per method). Every finished line also goes to ``log`` (the comparison's
    ``compare.log``), so the record survives the terminal; the live line never does."""

    def __init__(self, total: int = 0) -> None:
        self.total, self.done, self.start = total, 0, time.time()
        self.trained = 0
        self.runs_start: Optional[float] = None  # set when the first run starts
        self.log: Optional[Path] = None
        self.iterations = dict(expected=0, done=0, trained=0)
        self.trials = dict(running=0, stopped=0, finished=0, failed=0)
        self.best: Dict[str, float] = {}
        self.live = sys.stdout.isatty()
        self._live_shown = False

    def expect(self, n: int, iterations: int = 0) -> None:
        """More steps (and iterations) than estimated (a grid widened)."""
        self.total += n
        self.iterations['expected'] += iterations

    def left(self) -> str:
        it = self.iterations
        if not it['trained'] or self.runs_start is None:
            return ''
        rate = it['trained'] / max(1e-9, time.time() - self.runs_start)
        todo = max(0, it['expected'] - it['done'])
        return f', ~{_clock(todo / rate)} left' if todo else ''

    def step(self, what: str, trained: bool = False) -> None:
        self.done += 1
        self.trained += trained
        self.total = max(self.total, self.done)
        self._say(f'[{self.done}/{self.total} | {self.elapsed()}{self.left()}] {what}')

    def started(self) -> None:
        self.trials['running'] += 1
        self.show()

    def finished(self, method: str, r: Mapping[str, Any], nominal: int, final: bool,
                 ran: bool = True) -> None:
        """A trial ended (``ran``: it took a slot, not answered from the cache)."""
        self.trials['running'] -= ran
        key = 'failed' if 'error' in r else ('finished' if final else 'stopped')
        self.trials[key] += 1
        self.iterations['done'] += nominal
        self.iterations['trained'] += int(r.get('iterations') or 0)
        value = r.get('id_val')
        if isinstance(value, float) and math.isfinite(value):
            self.best[method] = max(self.best.get(method, -math.inf), value)

    def show(self) -> None:
        if not self.live:
            return
        t = self.trials
        best = ', '.join(f'{m} {v:.1f}' for m, v in self.best.items())
        line = (f'trials: {t["running"]} running, {t["stopped"]} at a rung, {t["finished"]} '
                f'finished, {t["failed"]} failed' + (f' | best ID-val: {best}' if best else '')
                + f' | {self.elapsed()}{self.left()}')
        width = 160
        sys.stdout.write('\r' + line[:width].ljust(min(width, len(line) + 2)))
        sys.stdout.flush()
        self._live_shown = True

    def note(self, what: str) -> None:
        self._say(f'    {what}')

    def elapsed(self) -> str:
        return _clock(time.time() - self.start)

    def _say(self, line: str) -> None:
        if self._live_shown:
            sys.stdout.write('\r\033[K')
            self._live_shown = False
        print(line, flush=True)
        if self.log is not None:
            with open(self.log, 'a') as f:
                f.write(line + '\n')
        self.show()


def load_recorded(path: Optional[Path], command: str = 'tools/demo.py') -> Dict[str, Any]:
    """The recorded choices of an earlier comparison, from its ``search.json`` or its report
    (``report.json``, e.g. ``benchmarks/results/camvid.json``), in one form: ``chosen``,
    ``search``, ``runs`` (the search runs, a list), ``source``, and the ``task`` / ``task_key``
    / ``budget`` they were made for where the file records them. A file that is not one is
    refused before a run starts; whether it has a choice for every row the comparison runs is
    the comparison's check (a study of some rows is a valid record for those rows)."""
    if path is None or not Path(path).is_file():
        raise InputError(f'{path} does not exist: run `python {command} --search` once to '
                         'choose every method\'s setting on the ID-val split')
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f'{path} is not JSON ({err}): give the search.json or report.json of '
                         'an earlier comparison') from err
    if not isinstance(rec, dict) or not isinstance(rec.get('chosen'), dict):
        raise InputError(f'{path} holds no chosen settings: give the search.json or '
                         'report.json of an earlier comparison')
    if 'search_runs' in rec or isinstance(rec.get('runs'), dict):  # a report
        task = rec.get('task') if isinstance(rec.get('task'), dict) else {}
        rec = dict(chosen=rec['chosen'], search=rec.get('search') or {},
                   runs=list(rec.get('search_runs') or []), source=rec.get('chosen_source'),
                   task=task.get('name'), task_key=task.get('key'),
                   budget=rec.get('budget_iterations'), form='report')
    else:
        rec = dict(rec, runs=list(rec.get('runs') or []), form='search')
    try:
        for setting in rec['chosen'].values():
            Point.from_dict(setting)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f'{path}: a chosen setting is malformed ({err!r})') from err
    return rec


def recorded_for(rec: Mapping[str, Any], task: TaskSpec, task_key: str) -> Dict[str, Any]:
    """Whether recorded choices were made for this task and budget: ``matches`` is True,
    False, or None when the file does not say; ``differences`` lists what differs."""
    differences, unknown = [], []
    if rec.get('task') is None:
        unknown.append('task')
    elif rec['task'] != task.name:
        differences.append(f'task {rec["task"]!r} (this one: {task.name!r})')
    elif rec.get('task_key') and rec['task_key'] != task_key:
        differences.append(f'another specification of {task.name!r} (its config, options or '
                           'sets differ)')
    if rec.get('budget') is None:
        unknown.append('budget')
    elif int(rec['budget']) != task.budget:
        differences.append(f'a budget of {rec["budget"]} iterations (this one: {task.budget})')
    matches = False if differences else (None if unknown else True)
    return dict(task=rec.get('task'), budget=rec.get('budget'), matches=matches,
                differences=differences, unknown=unknown)


def _space(spec: MethodSpec, spaces: Dict[str, List[Axis]],
           chosen: Dict[str, Point], lr_scale: float = 1.0,
           grids: Optional[Dict[str, Dict[str, Tuple[Any, ...]]]] = None) -> List[Axis]:
    """A method's starting grid: the default one, its LRs times ``lr_scale``, with the axes
    the task's ``grids`` gives for it replaced by those values."""
    given = (grids or {}).get(spec.name, {})

    def start(a: Axis) -> Axis:
        if a.name in given:
            return replace(a, values=tuple(given[a.name]))
        if a.name == 'lr':
            return replace(a, values=tuple(_scaled(v, lr_scale) for v in a.values))
        return a

    axes = [start(a) for a in spaces[spec.name]]
    if spec.name == 'DAFT w/o conversion' and 'DAFT' in chosen:
        axes.append(Axis('scope', (chosen['DAFT'].scope, )))
    return axes


def _grids(task: TaskSpec) -> Dict[str, Dict[str, Tuple[Any, ...]]]:
    """The task's own starting grids, checked against the methods' axes (``--quick``'s one-point
    grids keep their point: a smoke run is not a search)."""
    if task.spaces == 'quick':
        return {}
    spaces = SEARCH_SPACES
    for method, axes in task.grids.items():
        if method not in spaces:
            raise InputError(f'{task.name}: grids: {method} is not searched, so it has no grid '
                             f'(searched: {", ".join(spaces)}). Fix: remove it from grids')
        names = [a.name for a in spaces[method]]
        for name in axes:
            if name not in names:
                raise InputError(
                    f'{task.name}: grids: {method} has no axis {name!r} (its axes: '
                    f'{", ".join(names)}). Fix: name one of those in the compare dict\'s grids')
    return task.grids


def _scaled(lr: float, scale: float) -> float:
    """``lr * scale`` rounded to 12 significant digits: 0.01 x 0.125 is 0.00125, not
    0.0012500000000000002, in run keys, logs and reports."""
    return float(f'{lr * scale:.12g}')


#: What a search is sent back for a trial: its ID-val (a failed trial's is NaN: ranked last).
def _score(r: Mapping[str, Any]) -> float:
    value = r.get('id_val')
    return float(value) if 'error' not in r and value is not None else math.nan


def _rungs(spec: MethodSpec, task: TaskSpec, halving: Optional[int], eta: int,
           budget: Optional[int] = None) -> List[int]:
    """The iterations a method's search scores at: rungs of its (last) stage's length, the same
    fractions for every method (LP-FT: of its FT stage, after the shared probe stage)."""
    budgets = stage_budgets(spec, budget or task.budget, task.lp_fraction)
    length = budgets['ft' if spec.lp_first else spec.recipe]
    return list(halving_rungs(length, eta, halving)) if halving else [length]


def method_search(spec: MethodSpec, axes: List[Axis], seeds: Sequence[int], task: TaskSpec, *,
                  probe: Optional[Point], protocol: str = 'grid', halving: Optional[int] = 3,
                  eta: int = 3) -> Generator[List[Job], List[Dict[str, Any]], SearchResult]:
    """One method's search on ID-val as a source of trials (see :mod:`.engine`). LP-FT first
    trains its probe stage (LP at LP's choice) once per seed; every other trial starts there."""
    rungs = _rungs(spec, task, halving, eta)
    if spec.lp_first:
        yield [Job(spec.name, probe, seed, kind='probe') for seed in seeds]

    def as_jobs(steps, method: str):
        try:
            trials = next(steps)
            while True:
                results = yield [Job(method, t.point, t.seed, iters=t.iters, start=t.start,
                                     probe=probe if spec.lp_first else None) for t in trials]
                trials = steps.send([_score(r) for r in results])
        except StopIteration as stop:
            return stop.value

    if protocol == 'paper' and spec.name == 'DAFT':
        # the DAFT paper's two stages: the backbone LR first (head at 1x, no conversion), then
        # the head ratio at that LR, with conversion
        by_name = {a.name: a for a in axes}
        scope = by_name['scope'].values[0] if 'scope' in by_name else None
        first = yield from as_jobs(search_steps(
            [by_name['lr']], base=Point(lr=0.0, ratio=1.0, scope=scope), seeds=seeds[:1],
            rungs=rungs, eta=eta), 'DAFT w/o conversion')
        rest = [by_name['ratio']] + ([by_name['scope']] if 'scope' in by_name else [])
        second = yield from as_jobs(search_steps(
            rest, base=Point(lr=first.chosen.lr, ratio=1.0, scope=scope), seeds=seeds,
            rungs=rungs, eta=eta), spec.name)
        second.widened = [f'stage 1 (lr, ratio 1, no conversion): {first.to_dict()}'] \
            + second.widened
        for stage, n in first.iterations.items():
            second.iterations[stage] += n
        return second
    return (yield from as_jobs(search_steps(axes, seeds=seeds, rungs=rungs, eta=eta),
                               spec.name))


def _alongside(steps, extra: List[Job]):
    """A source that runs ``steps`` with ``extra`` jobs added to its first batch (their results
    go to the cache, not to ``steps``): independent work that may start early."""
    try:
        batch = next(steps)
    except StopIteration as stop:
        if extra:
            yield extra
        return stop.value
    try:
        batch = steps.send((yield batch + extra)[:len(batch)])
        while True:
            batch = steps.send((yield batch))
    except StopIteration as stop:
        return stop.value


def search_sources(spaces: Dict[str, List[Axis]], seeds: Sequence[int], task: TaskSpec,
                   progress: Progress, *, protocol: str = 'grid',
                   kept: Optional[Dict[str, Point]] = None, halving: Optional[int] = 3,
                   eta: int = 3, check_budget: bool = False
                   ) -> tuple[Dict[str, Any], Dict[str, Point], Dict[str, SearchResult]]:
    """The searches as sources of trials, one per independent chain of :data:`CHAINS` (LP-FT
    needs LP's choice, DAFT w/o conversion DAFT's head scope); they fill ``chosen`` and
    ``searches`` as they end. ``kept``: methods not searched again, with their recorded choice.
    ``check_budget``: FT at twice the budget starts as soon as FT is chosen, beside the rest of
    its chain (the table later finds it in the cache)."""
    kept = kept or {}
    chosen: Dict[str, Point] = {}
    searches: Dict[str, SearchResult] = {}
    grids = _grids(task)

    def chain(names: Sequence[str]):
        extra: List[Job] = []
        for name in names:
            if name in kept:
                chosen[name] = kept[name]
                continue
            spec = get_method(name)
            axes = _space(spec, spaces, chosen, task.lr_scale, grids)
            result = yield from _alongside(method_search(
                spec, axes, seeds, task, probe=chosen.get('LP'), protocol=protocol,
                halving=halving, eta=eta), extra)
            extra = []
            if name == 'FT' and check_budget:
                extra = [Job('FT', result.chosen, seed, budget=2 * task.budget)
                         for seed in seeds]
            searches[name], chosen[name] = result, result.chosen
            progress.note(f'{name}: chose {result.chosen.label()} (mean ID-val '
                          f'{result.mean(result.chosen):.2f} over {len(seeds)} seeds; '
                          f'{len(result.reached)} settings, {result.iterations["grid"]} + '
                          f'{result.iterations["finalists"]} iterations)'
                          + (f'; still best at the edge of {result.on_edge}'
                             if result.on_edge else ''))
        if extra:
            yield extra

    rows = {m.name for m in selected_methods(task.methods, task.only)}
    chains = [tuple(n for n in c if n in rows) for c in CHAINS]
    return {' > '.join(c): chain(c) for c in chains if c}, chosen, searches


@dataclass
class Options:
    quick: bool = False
    search: bool = False
    protocol: str = 'grid'
    seeds: Optional[int] = None
    work_dir: str = 'work_dirs/demo'
    recorded: Optional[str] = str(RECORDED)
    verbose: bool = False
    #: with ``search``: search only these methods, keep the recorded choices of the others
    search_methods: Optional[Sequence[str]] = None
    #: FT at its choice with twice the budget too: has it levelled off at the budget?
    check_budget: bool = False
    #: the command line that made the report (its search record says how to redo it)
    command: str = 'tools/demo.py'
    #: successive halving: rungs per search (1/eta^(n-1) .. 1 of the budget); None: every grid
    #: point trains the whole budget
    halving: Optional[int] = 3
    eta: int = 3  # the reduction factor: the best 1/eta of the points go on at each rung
    #: Ray: a running cluster's HOST:PORT (None: a local Ray, stopped at the end), what one trial
    #: asks for, and how many run at once (None: as many as the cluster can place)
    address: Optional[str] = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0
    concurrent: Optional[int] = None


def add_engine_args(p: Any) -> None:
    """The search's and Ray's flags, shared by ``tools/compare.py`` and ``tools/demo.py``."""
    g = p.add_argument_group('search and Ray')
    g.add_argument('--eta', type=int, default=3,
                   help='successive halving\'s reduction factor: the best 1/ETA of a grid\'s '
                   'points go on at each rung (1/ETA^2, 1/ETA and all of the budget; default 3)')
    g.add_argument('--rungs', type=int, default=3,
                   help='rungs of successive halving: scored at 1/ETA^(RUNGS-1) .. 1 of the '
                   'budget (default 3; 2 scores first at 1/ETA, for methods whose best LR only '
                   'pays off late)')
    g.add_argument('--no-halving', action='store_true',
                   help='train every grid point for the whole budget (the full grid)')
    g.add_argument('--address', default=None, metavar='HOST:PORT',
                   help='run the trials on a running Ray cluster (`ray start --head`, see '
                   'docs/compare.md); default: a local Ray on 127.0.0.1, stopped at the end')
    g.add_argument('--cpus-per-trial', type=float, default=1.0,
                   help='CPU cores per trial (its torch threads; default 1)')
    g.add_argument('--gpus-per-trial', type=float, default=None,
                   help='GPUs per trial (default 1 where the Ray cluster has GPUs, else 0)')
    g.add_argument('--concurrent-trials', '--workers', type=int, default=None, metavar='N',
                   dest='concurrent_trials',
                   help='at most N trials at once (default: as many as Ray can place: one per '
                   'core, or per GPU)')


def check_engine_args(p: Any, args: Any) -> None:
    if args.eta < 2:
        p.error(f'--eta must be >= 2, got {args.eta}')
    if args.rungs < 1:
        p.error(f'--rungs must be >= 1, got {args.rungs}')
    if args.cpus_per_trial <= 0:
        p.error(f'--cpus-per-trial must be > 0, got {args.cpus_per_trial}')
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        p.error(f'--gpus-per-trial must be >= 0, got {args.gpus_per_trial}')
    if args.concurrent_trials is not None and args.concurrent_trials < 1:
        p.error(f'--concurrent-trials must be >= 1, got {args.concurrent_trials}')
    if args.address is not None:
        try:
            RayCluster.parse_address(args.address)
        except InputError as err:
            p.error(str(err))


def engine_options(args: Any) -> Dict[str, Any]:
    return dict(halving=None if args.no_halving else args.rungs, eta=args.eta,
                address=args.address,
                cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                concurrent=args.concurrent_trials)


def run_benchmark(opts: Options) -> Dict[str, Any]:
    """The embedded demo: generate (or reuse) its data and pretrained backbone, then
    :func:`run_comparison` on its task."""
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    s = QUICK if opts.quick else DEFAULT
    work_dir = Path(opts.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(2)
    task = demo_task(s, work_dir, progress.step,
                     seeds=tuple(range(opts.seeds)) if opts.seeds else None, quick=opts.quick,
                     verbose=opts.verbose)
    return run_comparison(task, opts, progress)


def _estimate(task: TaskSpec, opts: Options, spaces: Dict[str, List[Axis]]
              ) -> Dict[str, int]:
    """Trials and iterations the comparison will ask for (trained or reused) if no grid widens:
    the searches (halving, the finalists' seeds, LP-FT's probe stages), every method's seeds at
    its choice (those of a searched choice are the finalists'), and FT at twice the budget."""
    from .methods import method_name
    seeds = task.seeds
    rows = selected_methods(task.methods, task.only)
    searched = {method_name(m) for m in opts.search_methods or ()} if opts.search else set()
    if opts.search and not searched:
        searched = {m.name for m in rows if not (m.of_daft or m.wise)}
    trials = iterations = 0
    for m in rows:
        if m.wise:  # not trained: mixed from LP-FT's runs
            continue
        budgets = stage_budgets(m, task.budget, task.lp_fraction)
        if m.lp_first:
            trials += len(seeds)
            iterations += len(seeds) * budgets['lp']
        if m.name not in searched:
            trials += len(seeds)
            iterations += len(seeds) * sum(budgets.values()) - (
                len(seeds) * budgets['lp'] if m.lp_first else 0)
            continue
        rungs = _rungs(m, task, opts.halving, opts.eta)
        n = _grid_size(_space(m, spaces, {}, task.lr_scale, _grids(task)))
        cost = halving_cost(n, rungs, eta=opts.eta, seeds=len(seeds))
        iterations += cost['grid'] + cost['finalists']
        trials += cost['trials']
    if opts.check_budget and any(m.name == 'FT' for m in rows):
        trials += len(seeds)
        iterations += len(seeds) * 2 * task.budget
    return dict(trials=trials, iterations=iterations)


class _Engine:
    """The comparison's side of :func:`~.engine.run_trials`: progress lines per trial, the
    search runs that reached the full budget (for the Pareto fronts), the failures, and the
    iterations each method trained."""

    def __init__(self, ctx: Context, cluster: RayCluster, slots: int, opts: Options,
                 progress: Progress) -> None:
        self.ctx, self.cluster, self.slots, self.opts = ctx, cluster, slots, opts
        self.progress = progress
        self.full_runs: List[Dict[str, Any]] = []
        self.failed: List[Dict[str, Any]] = []
        self.trained: Dict[str, int] = {}
        self.trials: Dict[str, int] = {}
        self.start = time.time()

    def run(self, sources: Dict[str, Any], phase: str) -> Dict[str, Any]:
        def on_result(job: Job, r: Dict[str, Any]) -> None:
            self._done(job, r, phase)
        return run_trials(self.ctx, sources, cluster=self.cluster, concurrent=self.slots,
                          threads=max(1, int(self.opts.cpus_per_trial)),
                          on_start=lambda job: self.progress.started(), on_result=on_result)

    def _done(self, job: Job, r: Dict[str, Any], phase: str) -> None:
        name = 'LP-FT' if job.kind == 'probe' else job.method
        self.trained[name] = self.trained.get(name, 0) + int(r.get('iterations') or 0)
        self.trials[name] = self.trials.get(name, 0) + (not r.get('reused'))
        # runs trained to the end of their budget in this comparison (the report's trained_runs)
        self.ctx.trained += job.kind == 'run' and 'ood' in r and not r.get('reused')
        final = 'ood' in r or job.iters is None
        self.progress.finished(job.method, r, self._span(job), final, ran=not r.get('reused'))
        how = ' (reused)' if r.get('reused') else f' ({r.get("seconds", 0):.0f}s)'
        if 'error' in r:
            self.failed.append(dict(trial=job.label(), phase=phase, error=r['error']))
            self.progress.step(f'FAILED {job.label()}: {r["error"]}', trained=True)
        elif job.kind == 'probe':
            if not r.get('reused'):
                self.progress.step(f'{job.label()} trained{how}', trained=True)
        elif job.budget is not None:
            if phase == 'table' and self.opts.search and r.get('reused'):
                return  # trained beside the search, said then
            self.progress.step(f'budget check: {job.method} seed {job.seed} at {job.budget} '
                               f'iterations (2x the budget): ID-val '
                               f'{r["id_val"]:.2f}  ID {r["id"]:.2f}  OOD mean '
                               f'{r["ood_mean"]:.2f}{how}', trained=not r.get('reused'))
        elif phase == 'search':
            if 'ood' in r:
                self.full_runs.append(r)
            self.progress.step(f'search {job.label()}: ID-val {r["id_val"]:.2f}'
                               + (f' (ID {r["id"]:.2f}, OOD mean {r["ood_mean"]:.2f})'
                                  if 'ood' in r else '') + how, trained=not r.get('reused'))
        elif not (self.opts.search and r.get('reused')):
            self.progress.step(f'{job.method} seed {job.seed}: ID {r["id"]:.2f}  OOD mean '
                               f'{r["ood_mean"]:.2f}  cos {r["cosine"]:.4f}  '
                               + ('(finished earlier: reused)' if r.get('reused')
                                  else f'({r["seconds"]:.0f}s)'), trained=not r.get('reused'))

    def _span(self, job: Job) -> int:
        """The iterations a job stands for, trained or reused (for the time left)."""
        budgets = stage_budgets(get_method(job.method), job.budget or self.ctx.task.budget,
                                self.ctx.task.lp_fraction)
        if job.kind == 'probe':
            return budgets['lp']
        length = budgets['ft'] if 'ft' in budgets else sum(budgets.values())
        return min(job.iters or length, length) - job.start

    def cost(self, budget: int, searches: Mapping[str, SearchResult],
             estimate: Mapping[str, int]) -> Dict[str, Any]:
        """What the comparison cost: per method the grid it searched and the iterations its
        search asked for (cached or not), and what this run trained; in all, in FT runs."""
        per = {}
        for m in selected_methods(self.ctx.task.methods, self.ctx.task.only):
            s = searches.get(m.name)
            per[m.name] = dict(trained_iterations=self.trained.get(m.name, 0),
                               trials_run=self.trials.get(m.name, 0))
            if s is not None:
                per[m.name].update(grid_points=len(s.reached), search_iterations=dict(
                    s.iterations), search_ft_runs=sum(s.iterations.values()) / budget)
        total = sum(self.trained.values())
        return dict(per_method=per, trained_iterations=total, ft_runs_trained=total / budget,
                    estimated_iterations=estimate['iterations'],
                    estimated_ft_runs=estimate['iterations'] / budget,
                    seconds=time.time() - self.start, concurrent_trials=self.slots,
                    where=self.cluster.where)


def run_comparison(task: TaskSpec, opts: Options,
                   progress: Optional['Progress'] = None) -> Dict[str, Any]:
    """Compare every method on ``task``; writes ``report.{json,md,png}`` (and ``search.json``
    when searching) to the work dir and returns the report. What the user gave (every set's
    folder, a recorded-choices file, the backbone and its key prefix) is checked first:
    :class:`~daft_mm.benchmark.task.InputError` before any run starts."""
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    init_default_scope(SCOPES[task.kind])  # the runs are built in the config's own scope
    progress = progress or Progress(0)
    t_start = progress.start
    seeds = task.seeds
    work_dir = Path(opts.work_dir).resolve()
    if opts.address is not None:  # before anything slow: a wrong address is an error at once
        RayCluster.check_reachable(opts.address)
    check_data(task)
    task_key = task.key()
    kept, earlier = _kept(opts)
    recorded = None if opts.search else load_recorded(Path(opts.recorded), opts.command)
    work_dir.mkdir(parents=True, exist_ok=True)
    progress.log = work_dir / 'compare.log'
    spaces = QUICK_SEARCH_SPACES if task.spaces == 'quick' else SEARCH_SPACES
    estimate = _estimate(task, opts, spaces)
    progress.expect(estimate['trials'], estimate['iterations'])
    progress.note(f'daft-mm comparison on {task.name} ({"quick" if opts.quick else "full"}): '
                  f'seeds {list(seeds)}, budget {task.budget} iterations per method'
                  + (f', the first {task.max_images} images of every set'
                     if task.max_images else '') + f', work dir {work_dir}')
    ctx = Context(task=task, work_dir=work_dir, step=progress.step, verbose=opts.verbose,
                  progress_bars=False, task_key=task_key)
    load_pretrained(ctx)
    with RayCluster(opts.address, Resources(opts.cpus_per_trial, opts.gpus_per_trial),
                    opts.verbose) as cluster:
        slots = min(cluster.slots, opts.concurrent or cluster.slots)
        progress.note(
            f'cost: about {estimate["iterations"] / task.budget:.1f} FT runs of {task.budget} '
            f'iterations ({estimate["iterations"]} iterations'
            + (f', successive halving at 1/{opts.eta} per rung, more if a grid widens'
               if opts.search and opts.halving else '')
            + f'), {slots} trial(s) at once on {cluster.where}, '
              f'{cluster.resources.text()} each; the time left shows once trials have finished; '
              f'log: {progress.log}')
        engine = _Engine(ctx, cluster, slots, opts, progress)
        progress.runs_start = time.time()
        if opts.search:
            sources, chosen, searches = search_sources(
                spaces, seeds, task, progress, protocol=opts.protocol, kept=kept,
                halving=opts.halving, eta=opts.eta, check_budget=opts.check_budget)
            engine.run(sources, 'search')
            chosen = {m: chosen[m] for m in ORDER if m in chosen}
            searches = {m: searches[m] for m in ORDER if m in searches}
            searched = f' --search-methods {" / ".join(searches)}' if kept else ''
            record = dict(
                chosen={m: p.to_dict() for m, p in chosen.items()},
                search={m: (searches[m].to_dict() if m in searches else earlier['search'][m])
                        for m in chosen},
                runs=[r for r in earlier.get('runs', []) if r['method'] in kept]
                + [_brief(r) for r in engine.full_runs],
                protocol=opts.protocol, seeds=list(seeds),
                halving=dict(rungs=opts.halving, eta=opts.eta) if opts.halving else None,
                failed=engine.failed,
                source=f'{opts.command} --search{" --quick" if opts.quick else ""} --protocol '
                       f'{opts.protocol}{searched}, {time.strftime("%Y-%m-%d")}: best mean '
                       f'ID-val {METRIC_NAMES[task.kind]} of the finalists (never OOD data)'
                       + (f'; {", ".join(kept)}: kept from {earlier.get("source") or "?"}'
                          if kept else ''),
                task=task.name, task_key=task_key, budget=task.budget)
            atomic_write_json(str(work_dir / 'search.json'), record, indent=1, default=str)
            source = f'--search (written to {work_dir / "search.json"})'
            made_for = (recorded_for(earlier, task, task_key) if kept else
                        dict(task=task.name, budget=task.budget, matches=True, differences=[],
                             unknown=[]))
        else:
            record = recorded
            chosen = {m: Point.from_dict(p) for m, p in record['chosen'].items()}
            how = record.get('source') or 'the file does not say how they were chosen'
            source = f'{opts.recorded} ({how})'
            made_for = recorded_for(record, task, task_key)
        progress.note(f'settings from {source}')
        if made_for['matches'] is False:
            progress.note('WARNING: these choices were made for '
                          + '; '.join(made_for['differences'])
                          + ': not chosen on this task\'s ID-val at this budget (said in the '
                          'report); run --search for choices of your own')

        rows_of_task = selected_methods(task.methods, task.only)
        names = {m.name for m in rows_of_task}
        if 'WiSE-FT' in names and 'LP-FT' not in names:
            raise InputError('WiSE-FT mixes the two ends of LP-FT\'s runs: list LP-FT in the rows '
                             'too')
        absent = [name for name in dict.fromkeys(n for m in rows_of_task for n in _needs(m))
                  if name not in chosen]
        if absent:
            raise InputError(f'no chosen setting for {absent} in {source}: run --search with '
                             f'--search-methods {" ".join(repr(m) for m in absent)}')

        def setting(m: MethodSpec) -> Point:
            if not m.of_daft:
                return chosen[m.name]
            daft = chosen['DAFT']
            return daft if m.ratio is None else replace(daft, ratio=m.ratio)

        def table():
            # an LP-FT run whose two ends WiSE-FT still needs trains again if they are gone
            rerun = set()
            if any(m.wise for m in rows_of_task):
                from .wise import seeds_to_rerun
                rerun = set(seeds_to_rerun(ctx, chosen['LP-FT'], chosen['LP'], seeds))
            jobs = [Job(m.name, setting(m), seed,
                        probe=chosen['LP'] if m.lp_first else None,
                        rerun=m.lp_first and seed in rerun)
                    for seed in seeds for m in rows_of_task if not m.wise]
            # the probe stages of the LP-FT runs that will train (none when all are cached)
            probes = sorted({j.seed for j in jobs
                             if j.probe is not None and cached_result(ctx, j) is None})
            if probes:
                yield [Job('LP-FT', chosen['LP'], seed, kind='probe') for seed in probes]
            longer = [Job('FT', chosen['FT'], seed, budget=2 * task.budget) for seed in seeds]
            check = opts.check_budget and 'FT' in names
            return jobs, (yield jobs + (longer if check else []))

        jobs, rows = engine.run({'table': table()}, 'table')['table']
        results: Dict[str, List[Dict[str, Any]]] = {m.name: [] for m in rows_of_task}
        for job, r in zip(jobs, rows):
            if 'error' not in r:
                results[job.method].append(r)
        wise = None
        if any(m.wise for m in rows_of_task):
            from .wise import wise_ft
            alpha, results['WiSE-FT'], by_alpha = wise_ft(
                ctx, chosen['LP-FT'], chosen['LP'], [r['seed'] for r in results['LP-FT']])
            wise = dict(alpha=alpha, id_val_by_alpha=by_alpha,
                        chosen_on='mean ID-val over the seeds')
            progress.note(f'WiSE-FT: alpha {alpha:g} chosen on ID-val (' + ', '.join(
                f'{a} {sum(v) / len(v):.2f}' for a, v in by_alpha.items()) + ')')
        empty = [m for m, rs in results.items() if not rs]
        if empty:
            raise RuntimeError(f'every run of {empty} at its chosen setting failed: '
                               + '; '.join(f'{f["trial"]}: {f["error"]}' for f in engine.failed))
        budget_check = None
        if opts.check_budget and 'FT' in names:
            longer = [r for r in rows[len(jobs):] if 'error' not in r]
            budget_check = _budget_check(task.budget, results['FT'], longer) if longer else None
            if budget_check:
                progress.note(budget_check['verdict'])
    floor = None
    if task.floor:  # not trained: read from the training labels here, in seconds
        from .prior import evaluate_prior
        train = load_run_config(ctx, work_dir / 'unused', 1, {}).train_dataloader.dataset
        floor = evaluate_prior(ctx, train)
        progress.note(f'image-blind prior: ID {floor["id"]:.2f}, '
                      + ', '.join(f'{k} {v:.2f}' for k, v in floor['ood'].items()))
    cost = engine.cost(task.budget, searches if opts.search else {}, estimate)
    progress.note(f'cost: {cost["trained_iterations"]} iterations trained '
                  f'({cost["ft_runs_trained"]:.1f} FT runs) in {_clock(cost["seconds"])}')
    report = _report(opts, task, chosen, source, record, results, ctx, t_start, budget_check,
                     made_for, floor)
    report['wise_ft'] = wise
    report.update(cost=cost, failed_trials=engine.failed)
    write_report(report, work_dir)
    return report


def _budget_check(budget: int, at_budget: List[Dict[str, Any]],
                  at_twice: List[Dict[str, Any]]) -> Dict[str, Any]:
    """FT's ID-val at the budget and at twice it, seed for seed: a budget too short for FT
    would favour the methods that start closer to the answer (LP, DAFT's probe phase). The
    longer runs' own ID and OOD scores are kept too (``at_twice_summary``, ``runs``)."""
    a = stat([r['id_val'] for r in at_budget])
    b = stat([r['id_val'] for r in at_twice])
    gain = b['mean'] - a['mean']
    spread = max(a['std'], b['std'], 0.0)
    levelled = gain <= max(1.0, spread)
    ood_names = list(at_twice[0]['ood'])
    return dict(budget=budget, id_val_at_budget=a, id_val_at_twice=b, gain=gain,
                levelled=levelled,
                at_twice_summary=summarize({'FT': at_twice}, ood_names)['FT'],
                runs=[{k: v for k, v in r.items() if k != 'counts'} for r in at_twice],
                verdict=f'FT at its choice: ID-val {a["mean"]:.2f} at {budget} iterations, '
                        f'{b["mean"]:.2f} at {2 * budget} ({gain:+.2f}): '
                        + ('levelled off (gain within 1 point or the seed spread)' if levelled
                           else 'still improving: the budget favours fast starters'))


def _needs(m: MethodSpec) -> Tuple[str, ...]:
    """The methods whose chosen settings a row runs with: its own; LP's too for LP-FT's probe
    stage; DAFT's for DAFT's variants; LP-FT's (and LP's) for WiSE-FT, which mixes its runs."""
    if m.of_daft:
        return ('DAFT', )
    if m.wise:
        return ('LP', 'LP-FT')
    return ('LP', m.name) if m.lp_first else (m.name, )


def _kept(opts: Options) -> tuple[Dict[str, Point], Dict[str, Any]]:
    """With ``search_methods``: the recorded choices of the other methods, and the record."""
    if not opts.search_methods:
        return {}, {}
    from .methods import method_name
    try:
        searched = {method_name(m) for m in opts.search_methods}
    except KeyError as err:
        raise InputError(f'--search-methods: {err.args[0]}') from None
    earlier = load_recorded(Path(opts.recorded))
    return ({m: Point.from_dict(p) for m, p in earlier['chosen'].items()
             if m not in searched}, earlier)


def _grid_size(axes: Sequence[Axis]) -> int:
    n = 1
    for axis in axes:
        n *= len(axis.values)
    return n


def _brief(r: Dict[str, Any]) -> Dict[str, Any]:
    keys = ('method', 'setting', 'seed', 'id_val', 'id', 'ood_mean', 'cosine', 'budgets')
    return {k: r[k] for k in keys}


def _floor_args(summary: Mapping[str, Any], floor: Optional[Mapping[str, Any]],
                on: str) -> Dict[str, Any]:
    """The floor's mean score and FT's and DAFT's on the verdict's set (``on``), from the
    table's summary (the floor is one of its rows)."""
    def mean(method: str) -> float:
        s = summary[method]
        return (s['ood_mean_miou'] if on == 'OOD mean' else s['ood_miou'][on])['mean']
    if not floor:
        return {}
    return dict(floor=mean(floor['method']),
                scores={m: mean(m) for m in ('FT', 'DAFT') if m in summary})


def _verdict(paired: Mapping[str, Any], headline: Optional[str], boot: Optional[Mapping[str, Any]],
             summary: Mapping[str, Any], floor: Optional[Mapping[str, Any]],
             ood_names: Sequence[str]) -> str:
    """DAFT's verdict line on the headline set (else the OOD mean, or the one OOD set), with the
    floor's distance where the table has one."""
    on = headline or ('OOD mean' if len(ood_names) > 1 else ood_names[0])
    return verdict_line(paired, 'DAFT', headline, boot, **_floor_args(summary, floor, on))


#: what says two records were made on the same data (a set's folder differs between machines)
_SAME_DATA = ('type', 'ann_file', 'img_path', 'images', 'boxes', 'parts', 'source_repository',
              'source_commit')


def attach_floor(report: Dict[str, Any], floor: Mapping[str, Any]) -> Dict[str, Any]:
    """``report`` with the image-blind floor as a row and in its verdict, for a report made
    without it (``benchmarks/image_blind_floor.py`` computes it alone). Refused if the report has
    one, or if the floor was scored on other sets or data (the provenance's counts and commits)."""
    if report.get('floor'):
        raise ValueError('the report has its image-blind floor already')
    task = report.get('task') or {}
    for key in ('name', 'max_images'):
        if floor.get(f'task_{key}') != task.get(key):
            raise ValueError(f'the floor is of {key} {floor.get(f"task_{key}")!r}, the report '
                             f'of {task.get(key)!r}: compute it for the report\'s task')
    if list(floor['ood']) != list(report['ood_sets']):
        raise ValueError(f'the floor was scored on the OOD sets {list(floor["ood"])}, the report '
                         f'on {report["ood_sets"]}: compute it for the report\'s task')
    mine = (floor.get('provenance') or {}).get('sets', {})
    theirs = (report.get('provenance') or {}).get('sets', {})
    differ = sorted(k for k in set(mine) | set(theirs)
                    if {f: (mine.get(k) or {}).get(f) for f in _SAME_DATA}
                    != {f: (theirs.get(k) or {}).get(f) for f in _SAME_DATA})
    if differ or not mine:
        which = ', '.join(differ) if differ else 'the floor records none'
        raise ValueError(f'the floor and the report were made on different data ({which}): '
                         'compute the floor on the report\'s sets')
    row = {k: floor[k] for k in ('method', 'seed', 'setting', 'id_val', 'id', 'ood', 'ood_mean',
                                 'cosine', 'cosine_pooled')}
    out = dict(report, floor=row)
    out['methods'] = dict(report['methods'], **summarize({row['method']: [row]},
                                                         report['ood_sets']))
    out['verdict'] = _verdict(report['paired_to_ft'], report.get('headline'),
                              report.get('bootstrap_to_ft'), out['methods'], row,
                              report['ood_sets'])
    return out


def _evaluator_types(evaluator: Any) -> str:
    """The metric types of an evaluator config (one metric or a list)."""
    cfgs = [evaluator] if isinstance(evaluator, Mapping) else list(evaluator or ())
    return ', '.join(str(c.get('type')) for c in cfgs) or 'none'


def _report(opts: Options, task: TaskSpec, chosen: Dict[str, Point], source: str,
            record: Dict[str, Any], results: Dict[str, List[Dict[str, Any]]], ctx: Context,
            t_start: float, budget_check: Optional[Dict[str, Any]],
            made_for: Mapping[str, Any], floor: Optional[Dict[str, Any]] = None
            ) -> Dict[str, Any]:
    ood_names = list(next(iter(results.values()))[0]['ood'])
    classes = ctx.dataset_meta.get('classes') or ()
    if made_for['matches'] is False:
        chosen_how = ('settings recorded for ' + '; '.join(made_for['differences'])
                      + ', NOT chosen on this task\'s ID-val at this budget')
    elif made_for['matches'] is None:
        chosen_how = ('settings recorded by a file that does not say which '
                      + ' or '.join(made_for['unknown']) + ' they were chosen for')
    else:
        chosen_how = 'every setting chosen on ID-val only'
    paired = paired_differences(results, ood_names)
    headline = task.headline if task.headline in ood_names else None
    boot = per_class = None
    rows = dict(results, **({floor['method']: [floor]} if floor else {}))  # the floor: a row,
    if headline and all('counts' in r for rs in rows.values() for r in rs):  # never paired
        boot = block_bootstrap(results, headline)
        per_class = {m: per_class_iou(rs, headline, classes) for m, rs in rows.items()}
    summary = summarize(rows, ood_names)
    runs = {m: [{k: v for k, v in r.items() if k != 'counts'} for r in rs]
            for m, rs in results.items()}  # per-image counts stay in the run cache
    return {
        'title': report_title(opts.quick, len(task.seeds), task.name, task.max_images,
                              task.budget),
        'premise': (task.description + '; ' if task.description else '')
        + 'every method starts from the same pretrained backbone with '
        + ('a fresh decode head' if task.kind == 'seg' else 'a fresh neck and heads')
        + ' and gets the same iteration budget',
        'score': METRIC_NAMES[task.kind],
        'metric': (f'mIoU (%) on {len(classes)} classes of the ID test set\'s dataset (absent '
                   'and never-predicted classes skipped, as in mmseg IoUMetric)'
                   if task.kind == 'seg' else
                   f'bbox mAP (%) on {len(classes)} classes with the config\'s own mmdet metric '
                   f'({_evaluator_types(ctx.evaluator)}; CocoMetric\'s is AP over IoU '
                   '0.50:0.95, rounded by mmdet to 0.1 point; no per-image counts, so intervals '
                   'are over seeds only)')
                  + f'; spread = sample std over seeds; {chosen_how}',
        'cosine_similarity': 'mean per-pixel cosine of the deepest backbone features, '
                             'fine-tuned vs pretrained, on the ID test images',
        'seeds': list(task.seeds),
        'budget_iterations': task.budget,
        'budget_check': budget_check,
        'ood_sets': ood_names,
        'methods_described': {m.name: describe(m, task.kind)
                              for m in selected_methods(task.methods, task.only)},
        'ablations': [m.name for m in ABLATIONS + AT_DAFT if m.name in results] + ['DAFT'],
        'chosen': {m: p.to_dict() for m, p in chosen.items()},
        'chosen_source': source,
        'chosen_for': dict(made_for),
        'search': record.get('search', {}),
        'search_runs': record.get('runs', []),
        'paired_to_ft': paired,
        'headline': headline,
        'bootstrap_to_ft': boot,
        'per_class': per_class,
        'verdict': _verdict(paired, headline, boot, summary, floor, ood_names),
        'task': dict(asdict(task), key=ctx.task_key, classes=list(classes)),
        'backbone_checkpoint': task.backbone,
        'provenance': provenance(task),
        'methods': summary,
        'floor': {k: v for k, v in floor.items() if k != 'counts'} if floor else None,
        'runs': runs,
        'trained_runs': ctx.trained,
        'code': dict(hash=code_hash(), commit=repo_commit()),
        # the augmentation every method trained with (the user's, e.g. PhotoMetricDistortion)
        'train_pipeline': [dict(t) for t in load_run_config(
            ctx, ctx.work_dir / 'unused', 1, {}).train_dataloader.dataset.get('pipeline', [])],
        'seconds': time.time() - t_start,
    }


def _cost_md(cost: Optional[Mapping[str, Any]], budget: int) -> str:
    """What the comparison cost, in FT runs of the budget, and each method's search."""
    if not cost:
        return ''
    parts = []
    for m, c in cost['per_method'].items():
        if 'grid_points' in c:
            parts.append(f'{m} {c["grid_points"]} settings, {c["search_ft_runs"]:.1f}')
    searched = ('; searches (settings, FT runs asked for, cached or not): ' + '; '.join(parts)
                if parts else '')
    return (f'Cost: {cost["ft_runs_trained"]:.1f} FT runs of {budget} iterations trained here '
            f'(estimated {cost["estimated_ft_runs"]:.1f} before it started){searched}. '
            f'{cost["concurrent_trials"]} trial(s) at once on {cost["where"]}.\n\n')


def _set_md(s: Mapping[str, Any]) -> str:
    if 'error' in s:
        return s['error']
    if 'parts' in s:
        return f'{len(s["parts"])} concatenated sets'
    where = s.get('ann_file') or s.get('img_path') or ''
    count = f', {s["images"]} images' if s.get('images') is not None else ''
    repo = f' {s["source_repository"]}' if s.get('source_repository') else ''
    commit = (f', source{repo} commit {s["source_commit"][:12]}' if s.get('source_commit')
              else '')
    return f'`{where}` under `{s.get("data_root")}`{count}{commit}'


def _provenance_md(record: Optional[Mapping[str, Any]]) -> str:
    """The data and backbone lines of the Markdown report."""
    if not record:
        return ''
    lines = []
    for name, s in record['sets'].items():
        if 'parts' in s:  # a ConcatDataset: one line per part
            lines += [f'- {name} [{i}]: {_set_md(p)}' for i, p in enumerate(s['parts'])]
        else:
            lines.append(f'- {name}: {_set_md(s)}')
    bb = record['backbone']
    pre = bb.get('pretraining') or {}
    data = pre.get('data') or {}
    how = (f' (pretrained on {data.get("repository", "?")} @ {str(data.get("commit"))[:12]}, '
           f'val top-1 {pre["val_top1"]:.1f}%)' if 'val_top1' in pre else '')
    lines.append(f'- backbone: `{osp.basename(bb["checkpoint"])}` sha256 '
                 f'{bb.get("sha256", "?")[:16]}{how}')
    splits = record.get('splits') or {}
    if 'val_gap_seconds' in splits:
        lines.append(f'- ID-val: {splits.get("id_val", "")}, {splits["val_gap_seconds"]:g} s '
                     'of driving from the nearest training frame')
    return 'Data and backbone:\n\n' + '\n'.join(lines) + '\n\n'


def _labels(report: Mapping[str, Any]) -> Dict[str, str]:
    """Each row's setting as the table shows it; LP-FT's includes its probe stage's LR."""
    labels = {m: Point.from_dict(p).label() for m, p in report['chosen'].items()}
    if report.get('wise_ft'):
        labels['WiSE-FT'] = f'alpha={report["wise_ft"]["alpha"]:g} on LP-FT\'s two ends'
    runs = (report.get('runs') or {}).get('LP-FT') or []
    probe = runs[0].get('lp_setting') if runs else report['chosen'].get('LP')
    if 'LP-FT' in labels and probe:
        labels['LP-FT'] = f'probe {Point.from_dict(probe).label()}, then {labels["LP-FT"]}'
    return labels


def write_report(report: Dict[str, Any], out_dir: Path, stem: str = 'report') -> None:
    """``<stem>.{json,md,png}`` in ``out_dir``: the table at the choices (and FT at twice the
    budget), the paired differences to FT with the verdict, the budget check, each method's
    Pareto front of its search runs in words, and the figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(str(out_dir / f'{stem}.json'), report, indent=1, default=str)
    labels = _labels(report)
    rows = dict(report['methods'])
    check = report.get('budget_check') or {}
    if check.get('at_twice_summary'):
        row = f'FT at 2x budget ({2 * check["budget"]} it., the budget check)'
        rows[row] = check['at_twice_summary']
        labels[row] = labels.get('FT', '')
    metric = report.get('score', 'mIoU')
    table = markdown_table(rows, report['ood_sets'], labels, metric)
    paired = report.get('paired_to_ft')
    fronts = front_lines(report['search_runs'])
    md = (f'# {report["title"]}\n\n{report["premise"]}. {report["metric"]}. Feature cos: '
          f'{report["cosine_similarity"]}.\n\nSettings from {report["chosen_source"]}.\n\n'
          f'{table}\n\nAblations: {", ".join(report["ablations"])}.\n\n'
          + (paired_lines(paired, report['ood_sets']) + '\n\n' if paired else '')
          + (bootstrap_lines(report['bootstrap_to_ft'], report['headline']) + '\n\n'
             if report.get('bootstrap_to_ft') else '')
          + (per_class_lines(report['per_class'], report['headline']) + '\n\n'
             if report.get('per_class') else '')
          + (f'**Verdict.** {report["verdict"]}\n\n' if report.get('verdict') else '')
          + (f'Budget: {check["verdict"]}.\n\n' if check else '')
          + (f'Pareto front of each method\'s search runs (ID {metric}, OOD mean {metric}; mean '
             'over the '
             'seeds a point ran with):\n\n' + '\n'.join(f'- {line}' for line in fronts) + '\n\n'
             if fronts else 'Pareto fronts: no search runs in this report (the settings were '
             'recorded by an earlier search; its file holds none).\n\n')
          + _cost_md(report.get('cost'), report['budget_iterations'])
          + _provenance_md(report.get('provenance'))
          + f'![{stem}]({stem}.png)\n\nTotal time: {report["seconds"]:.0f}s '
          f'({report["trained_runs"]} runs trained, the rest reused).\n')
    with atomic_write(str(out_dir / f'{stem}.md')) as f:
        f.write(md)
    plot_report(report['methods'], report['search_runs'], out_dir / f'{stem}.png',
                report['title'], ood_label=_ood_label(report['ood_sets']), metric=metric)
    print('\n' + table + '\n', flush=True)
    if report.get('verdict'):
        print(report['verdict'] + '\n', flush=True)
    print(f'report: {out_dir / stem}.{{md,json,png}} ({report["seconds"]:.0f}s)', flush=True)


def _ood_label(ood_sets: Sequence[str]) -> str:
    return f'OOD ({ood_sets[0]})' if len(ood_sets) == 1 else 'OOD mean'
