"""The comparison of methods on one task, end to end: each method at its setting chosen on ID-val
(recorded, or searched now), the ablations, the check that the budget suffices, and the report.
:func:`run_comparison` runs any :class:`~daft_mm.benchmark.task.TaskSpec` (``tools/compare.py``);
:func:`run_benchmark` is the embedded demo (``tools/demo.py``): its data and backbone, then the
same.

Every method: the same pretrained backbone, a fresh decode head, the same iteration budget, the
same seeds; every choice on ID-val only (OOD sets are evaluated, never used to choose).
"""
from __future__ import annotations

import json
import os.path as osp
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from daft_mm.utils import atomic_write, atomic_write_json

from .data import DEFAULT, QUICK, repo_commit
from .demo_task import DEMO_CONFIGS, demo_task
from .methods import COMPARED, ABLATIONS, MethodSpec, Point, get_method
from .report import (front_lines, markdown_table, paired_differences, paired_lines,
                     plot_report, report_title, stat, summarize, verdict_line)
from .runs import Context, RunPool, Task, code_hash, load_pretrained
from .selection import Axis, BatchScore, SearchResult, grid_search
from .task import InputError, TaskSpec, check_data, provenance

__all__ = ['RECORDED', 'SEARCH_SPACES', 'QUICK_SEARCH_SPACES', 'Progress', 'Options',
           'run_benchmark', 'run_comparison', 'load_recorded', 'write_report']

#: The choices ``--search`` made on ID-val, with every search run (for the Pareto plot).
RECORDED = DEMO_CONFIGS / 'recorded_search.json'
SCOPES = ('predictors', 'new_modules')
#: Starting grids (widened by the search while the best point is at an edge). DAFT's head LR is
#: lr x ratio: the diagonal lr=1e-2/ratio=1e2, 1e-3/1e3 keeps the head near LP's LR while the
#: backbone slows down, the regime the paper's ratios (1e3-3e6) point to. The ratio stops at 1:
#: below it the head trains slower than the backbone, which is not DAFT's integrated LP+FT (the
#: first search, before this floor, tried 0.1 once: it lost to 1).
SEARCH_SPACES: Dict[str, List[Axis]] = {
    'LP': [Axis('lr', (0.1, 0.3, 1.0), step=3.0)],
    'FT': [Axis('lr', (0.03, 0.1, 0.3), step=3.0)],
    'LP-FT': [Axis('lr', (0.03, 0.1, 0.3), step=3.0)],
    'DAFT': [Axis('lr', (0.001, 0.01, 0.1), step=10.0),
             Axis('ratio', (10.0, 100.0, 1000.0), step=10.0, floor=1.0), Axis('scope', SCOPES)],
    'DAFT w/o conversion': [Axis('lr', (0.001, 0.01, 0.1), step=10.0),
                            Axis('ratio', (10.0, 100.0, 1000.0), step=10.0, floor=1.0)],
    'conversion only': [Axis('lr', (0.03, 0.1, 0.3), step=3.0)],
}
#: --quick: one point per method (a smoke test of the whole path, not a search).
QUICK_SEARCH_SPACES: Dict[str, List[Axis]] = {
    'LP': [Axis('lr', (0.3, ))], 'FT': [Axis('lr', (0.1, ))], 'LP-FT': [Axis('lr', (0.1, ))],
    'DAFT': [Axis('lr', (0.01, )), Axis('ratio', (10.0, )), Axis('scope', ('new_modules', ))],
    'DAFT w/o conversion': [Axis('lr', (0.01, )), Axis('ratio', (10.0, ))],
    'conversion only': [Axis('lr', (0.1, ))],
}
#: Searched in this order: LP-FT's probe stage is LP at LP's choice; the DAFT ablation without
#: conversion uses DAFT's head scope.
ORDER = ('LP', 'FT', 'LP-FT', 'DAFT', 'DAFT w/o conversion', 'conversion only')
#: Independent chains of that order, searched side by side.
CHAINS = (('LP', 'LP-FT'), ('DAFT', 'DAFT w/o conversion'), ('FT', 'conversion only'))


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f'{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}' if s >= 3600 else \
        f'{s // 60:d}:{s % 60:02d}'


class Progress:
    """One line per finished step: steps done of those expected, elapsed time, the time left
    (from the runs trained so far) and what finished. Every line also goes to ``log`` (the
    comparison's ``compare.log``), so the record survives the terminal."""

    def __init__(self, total: int = 0) -> None:
        self.total, self.done, self.start = total, 0, time.time()
        self.trained = 0
        self.runs_start: Optional[float] = None  # set when the first run starts
        self.log: Optional[Path] = None

    def expect(self, n: int) -> None:
        """More steps than estimated (a grid widened)."""
        self.total += n

    def step(self, what: str, trained: bool = False) -> None:
        self.done += 1
        self.trained += trained
        self.total = max(self.total, self.done)
        left = self.total - self.done
        eta = ''
        if left and self.trained and self.runs_start is not None:
            eta = f', ~{_clock((time.time() - self.runs_start) / self.trained * left)} left'
        self._say(f'[{self.done}/{self.total} | {self.elapsed()}{eta}] {what}')

    def note(self, what: str) -> None:
        self._say(f'    {what}')

    def elapsed(self) -> str:
        return _clock(time.time() - self.start)

    def _say(self, line: str) -> None:
        print(line, flush=True)
        if self.log is not None:
            with open(self.log, 'a') as f:
                f.write(line + '\n')


def load_recorded(path: Optional[Path], command: str = 'tools/demo.py') -> Dict[str, Any]:
    """The recorded choices of an earlier comparison, from its ``search.json`` or its report
    (``report.json``, e.g. ``benchmarks/results/camvid.json``), in one form: ``chosen``,
    ``search``, ``runs`` (the search runs, a list), ``source``, and the ``task`` / ``task_key``
    / ``budget`` they were made for where the file records them. Every compared method must
    have a choice; anything else is refused before a run starts."""
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
    missing = [m.name for m in COMPARED if m.name not in rec['chosen']]
    if missing:
        raise InputError(f'{path} has no recorded setting for {missing}; re-run --search')
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
           chosen: Dict[str, Point]) -> List[Axis]:
    axes = list(spaces[spec.name])
    if spec.name == 'DAFT w/o conversion' and 'DAFT' in chosen:
        axes.append(Axis('scope', (chosen['DAFT'].scope, )))
    return axes


def search(pool: RunPool, spaces: Dict[str, List[Axis]], seeds: Sequence[int],
           progress: Progress, protocol: str = 'grid', kept: Optional[Dict[str, Point]] = None
           ) -> tuple[Dict[str, Point], Dict[str, SearchResult], List[Dict[str, Any]]]:
    """Choose every method's setting on ID-val; returns the choices, the searches and every run.
    ``kept``: methods not searched again, with their recorded choice (their searches and runs
    are then not among those returned)."""
    kept = kept or {}
    chosen: Dict[str, Point] = {}
    searches: Dict[str, SearchResult] = {}
    runs: List[Dict[str, Any]] = []

    def done(task: Task, r: Dict[str, Any]) -> None:
        runs.append(r)
        progress.step(f'search {task[0]}: {task[1].label()} seed {task[2]}: ID-val '
                      f'{r["id_val"]:.2f} (ID {r["id"]:.2f}, OOD mean {r["ood_mean"]:.2f})'
                      + (' (reused)' if r['reused'] else f' ({r["seconds"]:.0f}s)'),
                      trained=not r['reused'])

    def scorer(spec: MethodSpec) -> BatchScore:
        calls = []

        def score(pairs: List[tuple[Point, int]]) -> List[float]:
            if calls:  # a widened grid: first-seed runs beyond the estimated grid
                progress.expect(sum(1 for _, seed in pairs if seed == seeds[0]))
            calls.append(len(pairs))
            results = pool.run([(spec.name, point, seed) for point, seed in pairs], done,
                               probe=chosen.get('LP'))  # LP-FT: after LP in its chain
            return [r['id_val'] for r in results]
        return score

    def search_chain(names: Sequence[str]) -> None:
        for name in names:
            if name in kept:
                chosen[name] = kept[name]
                continue
            spec = get_method(name)
            axes = _space(spec, spaces, chosen)
            if protocol == 'paper' and name == 'DAFT':
                searches[name] = paper_protocol(spec, axes, seeds, scorer)
            else:
                searches[name] = grid_search(scorer(spec), axes, seeds=seeds)
            chosen[name] = searches[name].chosen
            progress.note(f'{name}: chose {chosen[name].label()} (mean ID-val '
                          f'{searches[name].mean(chosen[name]):.2f} over {len(seeds)} seeds)'
                          + (f'; still best at the edge of {searches[name].on_edge}'
                             if searches[name].on_edge else ''))

    # Chains of dependent searches run concurrently and share the workers, so a grid's last
    # round never leaves a core idle while another method waits.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(CHAINS)) as threads:
        for future in [threads.submit(search_chain, chain) for chain in CHAINS]:
            future.result()
    return {m: chosen[m] for m in ORDER}, {m: searches[m] for m in ORDER if m in searches}, runs


def paper_protocol(spec: MethodSpec, axes: List[Axis], seeds: Sequence[int],
                   scorer: Callable[[MethodSpec], BatchScore]) -> SearchResult:
    """The DAFT paper's two stages: the backbone LR first (head at 1x, no conversion), then the
    head ratio at that LR, with conversion."""
    by_name = {a.name: a for a in axes}
    scope = by_name['scope'].values[0] if 'scope' in by_name else None
    first = grid_search(scorer(get_method('DAFT w/o conversion')), [by_name['lr']],
                        base=Point(lr=0.0, ratio=1.0, scope=scope), seeds=seeds[:1])
    rest = [by_name['ratio']] + ([by_name['scope']] if 'scope' in by_name else [])
    second = grid_search(scorer(spec), rest, base=Point(lr=first.chosen.lr, ratio=1.0,
                                                        scope=scope), seeds=seeds)
    second.widened = [f'stage 1 (lr, ratio 1, no conversion): {first.to_dict()}'] + second.widened
    return second


@dataclass
class Options:
    quick: bool = False
    search: bool = False
    protocol: str = 'grid'
    seeds: Optional[int] = None
    work_dir: str = 'work_dirs/demo'
    recorded: Optional[str] = str(RECORDED)
    verbose: bool = False
    workers: int = 2  # runs side by side, one torch thread each
    #: with ``search``: search only these methods, keep the recorded choices of the others
    search_methods: Optional[Sequence[str]] = None
    #: FT at its choice with twice the budget too: has it levelled off at the budget?
    check_budget: bool = False
    #: the command line that made the report (its search record says how to redo it)
    command: str = 'tools/demo.py'


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


def _estimate(task: TaskSpec, opts: Options, spaces: Dict[str, List[Axis]]) -> int:
    """Runs the comparison will train or reuse: the grids (if searching), the finalists' other
    seeds, every method's seeds at its choice (those of a searched choice are the finalists'),
    and FT at twice the budget."""
    from .methods import method_name
    seeds = task.seeds
    n = len(COMPARED) * len(seeds) + (len(seeds) if opts.check_budget else 0)
    searched = {method_name(m) for m in opts.search_methods or ()}
    if opts.search:
        for m in COMPARED:
            if searched and m.name not in searched:
                continue
            grid = _grid_size(spaces[m.name])
            n += grid + min(2, grid) * (len(seeds) - 1) - len(seeds)
    return n


def run_comparison(task: TaskSpec, opts: Options,
                   progress: Optional['Progress'] = None) -> Dict[str, Any]:
    """Compare every method on ``task``; writes ``report.{json,md,png}`` (and ``search.json``
    when searching) to the work dir and returns the report. What the user gave (every set's
    folder, a recorded-choices file, the backbone and its key prefix) is checked first:
    :class:`~daft_mm.benchmark.task.InputError` before any run starts."""
    import torch
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    init_default_scope('mmseg')
    progress = progress or Progress(0)
    t_start = progress.start
    seeds = task.seeds
    work_dir = Path(opts.work_dir).resolve()
    check_data(task)
    task_key = task.key()
    kept, earlier = _kept(opts)
    recorded = None if opts.search else load_recorded(Path(opts.recorded), opts.command)
    work_dir.mkdir(parents=True, exist_ok=True)
    progress.log = work_dir / 'compare.log'
    spaces = QUICK_SEARCH_SPACES if task.spaces == 'quick' else SEARCH_SPACES
    n_runs = _estimate(task, opts, spaces)
    progress.expect(n_runs)
    progress.note(f'daft-mm comparison on {task.name} ({"quick" if opts.quick else "full"}): '
                  f'seeds {list(seeds)}, budget {task.budget} iterations per method'
                  + (f', the first {task.max_images} images of every set'
                     if task.max_images else '') + f', work dir {work_dir}')
    progress.note(f'about {n_runs} fine-tuning runs'
                  + (' (grids, finalists with every seed, more if a grid widens)'
                     if opts.search else '') + ', '
                  + (f'{opts.workers} runs side by side (1 torch thread each)' if opts.workers > 1
                     else f'one at a time ({torch.get_num_threads()} torch threads)')
                  + '; the time left shows once the first run has finished; log: '
                  + str(progress.log))
    ctx = Context(task=task, work_dir=work_dir, step=progress.step, verbose=opts.verbose,
                  progress_bars=opts.verbose, task_key=task_key)
    load_pretrained(ctx)
    progress.runs_start = time.time()

    with RunPool(ctx, opts.workers) as pool:
        if opts.search:
            chosen, searches, search_runs = search(pool, spaces, seeds, progress, opts.protocol,
                                                   kept)
            searched = f' --search-methods {" / ".join(searches)}' if kept else ''
            record = dict(
                chosen={m: p.to_dict() for m, p in chosen.items()},
                search={m: (searches[m].to_dict() if m in searches else earlier['search'][m])
                        for m in chosen},
                runs=[r for r in earlier.get('runs', []) if r['method'] in kept]
                + [_brief(r) for r in search_runs],
                protocol=opts.protocol, seeds=list(seeds),
                source=f'{opts.command} --search{" --quick" if opts.quick else ""} --protocol '
                       f'{opts.protocol}{searched}, {time.strftime("%Y-%m-%d")}: best mean '
                       'ID-val mIoU of the finalists (never OOD data)'
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

        def done(task_: Task, r: Dict[str, Any]) -> None:
            if not opts.search or not r['reused']:
                progress.step(f'{task_[0]} seed {task_[2]}: ID {r["id"]:.2f}  OOD mean '
                              f'{r["ood_mean"]:.2f}  cos {r["cosine"]:.4f}  ({r["seconds"]:.0f}s'
                              + (', finished earlier: reused)' if r['reused'] else ')'),
                              trained=not r['reused'])

        def done_longer(task_: Task, r: Dict[str, Any]) -> None:
            progress.step(f'budget check: {task_[0]} seed {task_[2]} at '
                          f'{sum(r["budgets"].values())} iterations (2x the budget): ID-val '
                          f'{r["id_val"]:.2f}  ID {r["id"]:.2f}  OOD mean {r["ood_mean"]:.2f}'
                          + (' (reused)' if r['reused'] else f' ({r["seconds"]:.0f}s)'),
                          trained=not r['reused'])

        tasks = [(spec.name, chosen[spec.name], seed) for seed in seeds for spec in COMPARED]
        results: Dict[str, List[Dict[str, Any]]] = {m.name: [] for m in COMPARED}
        for task_, r in zip(tasks, pool.run(tasks, done, probe=chosen['LP'])):
            results[task_[0]].append(r)
        budget_check = None
        if opts.check_budget:
            longer = pool.run([('FT', chosen['FT'], seed) for seed in seeds], done_longer,
                              budget=2 * task.budget)
            budget_check = _budget_check(task.budget, results['FT'], longer)
            progress.note(budget_check['verdict'])
    report = _report(opts, task, chosen, source, record, results, ctx, t_start, budget_check,
                     made_for)
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
                runs=[dict(r) for r in at_twice],
                verdict=f'FT at its choice: ID-val {a["mean"]:.2f} at {budget} iterations, '
                        f'{b["mean"]:.2f} at {2 * budget} ({gain:+.2f}): '
                        + ('levelled off (gain within 1 point or the seed spread)' if levelled
                           else 'still improving: the budget favours fast starters'))


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


def _report(opts: Options, task: TaskSpec, chosen: Dict[str, Point], source: str,
            record: Dict[str, Any], results: Dict[str, List[Dict[str, Any]]], ctx: Context,
            t_start: float, budget_check: Optional[Dict[str, Any]],
            made_for: Mapping[str, Any]) -> Dict[str, Any]:
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
    return {
        'title': report_title(opts.quick, len(task.seeds), task.name, task.max_images,
                              task.budget),
        'premise': (task.description + '; ' if task.description else '')
        + 'every method starts from the same pretrained backbone with a fresh decode head and '
          'gets the same iteration budget',
        'metric': f'mIoU (%) on {len(classes)} classes of the ID test set\'s dataset (absent and '
                  'never-predicted classes skipped, as in mmseg IoUMetric); spread = sample std '
                  f'over seeds; {chosen_how}',
        'cosine_similarity': 'mean per-pixel cosine of the deepest backbone features, '
                             'fine-tuned vs pretrained, on the ID test images',
        'seeds': list(task.seeds),
        'budget_iterations': task.budget,
        'budget_check': budget_check,
        'ood_sets': ood_names,
        'methods_described': {m.name: m.description for m in COMPARED},
        'ablations': [m.name for m in ABLATIONS] + ['DAFT'],
        'chosen': {m: p.to_dict() for m, p in chosen.items()},
        'chosen_source': source,
        'chosen_for': dict(made_for),
        'search': record.get('search', {}),
        'search_runs': record.get('runs', []),
        'paired_to_ft': paired,
        'verdict': verdict_line(paired, 'DAFT'),
        'task': dict(asdict(task), key=ctx.task_key, classes=list(classes)),
        'backbone_checkpoint': task.backbone,
        'provenance': provenance(task),
        'methods': summarize(results, ood_names),
        'runs': {m: [dict(r) for r in rs] for m, rs in results.items()},
        'trained_runs': ctx.trained,
        'code': dict(hash=code_hash(), commit=repo_commit()),
        'seconds': time.time() - t_start,
    }


def _set_md(s: Mapping[str, Any]) -> str:
    if 'error' in s:
        return s['error']
    if 'parts' in s:
        return f'{len(s["parts"])} concatenated sets'
    where = s.get('ann_file') or s.get('img_path') or ''
    count = f', {s["images"]} images' if s.get('images') is not None else ''
    commit = f', source commit {s["source_commit"][:12]}' if s.get('source_commit') else ''
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
    return 'Data and backbone:\n\n' + '\n'.join(lines) + '\n\n'


def _labels(report: Mapping[str, Any]) -> Dict[str, str]:
    """Each row's setting as the table shows it; LP-FT's includes its probe stage's LR."""
    labels = {m: Point.from_dict(p).label() for m, p in report['chosen'].items()}
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
    table = markdown_table(rows, report['ood_sets'], labels)
    paired = report.get('paired_to_ft')
    fronts = front_lines(report['search_runs'])
    md = (f'# {report["title"]}\n\n{report["premise"]}. {report["metric"]}. Feature cos: '
          f'{report["cosine_similarity"]}.\n\nSettings from {report["chosen_source"]}.\n\n'
          f'{table}\n\nAblations: {", ".join(report["ablations"])}.\n\n'
          + (paired_lines(paired, report['ood_sets']) + '\n\n' if paired else '')
          + (f'**Verdict.** {report["verdict"]}\n\n' if report.get('verdict') else '')
          + (f'Budget: {check["verdict"]}.\n\n' if check else '')
          + ('Pareto front of each method\'s search runs (ID mIoU, OOD mean mIoU; mean over the '
             'seeds a point ran with):\n\n' + '\n'.join(f'- {line}' for line in fronts) + '\n\n'
             if fronts else 'Pareto fronts: no search runs in this report (the settings were '
             'recorded by an earlier search; its file holds none).\n\n')
          + _provenance_md(report.get('provenance'))
          + f'![{stem}]({stem}.png)\n\nTotal time: {report["seconds"]:.0f}s '
          f'({report["trained_runs"]} runs trained, the rest reused).\n')
    with atomic_write(str(out_dir / f'{stem}.md')) as f:
        f.write(md)
    plot_report(report['methods'], report['search_runs'], out_dir / f'{stem}.png',
                report['title'], ood_label=_ood_label(report['ood_sets']))
    print('\n' + table + '\n', flush=True)
    if report.get('verdict'):
        print(report['verdict'] + '\n', flush=True)
    print(f'report: {out_dir / stem}.{{md,json,png}} ({report["seconds"]:.0f}s)', flush=True)


def _ood_label(ood_sets: Sequence[str]) -> str:
    return f'OOD ({ood_sets[0]})' if len(ood_sets) == 1 else 'OOD mean'
