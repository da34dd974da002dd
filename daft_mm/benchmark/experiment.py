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

from .data import DEFAULT, QUICK
from .demo_task import DEMO_CONFIGS, demo_task
from .methods import COMPARED, ABLATIONS, MethodSpec, Point, get_method
from .report import front_lines, markdown_table, plot_report, report_title, stat, summarize
from .runs import Context, RunPool, Task, code_hash, load_pretrained
from .selection import Axis, BatchScore, SearchResult, grid_search
from .task import TaskSpec, provenance

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
QUICK_SEARCH_SPACES: Dict[str, List[Axis]] = {
    'LP': [Axis('lr', (0.3, ))], 'FT': [Axis('lr', (0.1, ))], 'LP-FT': [Axis('lr', (0.1, ))],
    'DAFT': [Axis('lr', (0.01, )), Axis('ratio', (10.0, 100.0)), Axis('scope', SCOPES)],
    'DAFT w/o conversion': [Axis('lr', (0.01, )), Axis('ratio', (100.0, ))],
    'conversion only': [Axis('lr', (0.1, ))],
}
#: Searched in this order: LP-FT's probe stage is LP at LP's choice; the DAFT ablation without
#: conversion uses DAFT's head scope.
ORDER = ('LP', 'FT', 'LP-FT', 'DAFT', 'DAFT w/o conversion', 'conversion only')
#: Independent chains of that order, searched side by side.
CHAINS = (('LP', 'LP-FT'), ('DAFT', 'DAFT w/o conversion'), ('FT', 'conversion only'))


class Progress:
    """One line per finished step with the elapsed time (training adds an mmengine bar)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.time()

    def step(self, what: str) -> None:
        self.done += 1
        print(f'[{self.done}/{self.total} | {self.elapsed()}] {what}', flush=True)

    def note(self, what: str) -> None:
        print(f'    {what}', flush=True)

    def elapsed(self) -> str:
        s = int(time.time() - self.start)
        return f'{s // 60:d}:{s % 60:02d}'


def load_recorded(path: Optional[Path], command: str = 'tools/demo.py') -> Dict[str, Any]:
    """The recorded choices; every compared method must have one."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f'{path} does not exist: run `python {command} --search` once '
                                'to choose every method\'s setting on the ID-val split')
    path = Path(path)
    rec = json.loads(path.read_text())
    missing = [m.name for m in COMPARED if m.name not in rec.get('chosen', {})]
    if missing:
        raise ValueError(f'{path} has no recorded setting for {missing}; re-run --search')
    return rec


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
                      + (' (reused)' if r['reused'] else f' ({r["seconds"]:.0f}s)'))

    def scorer(spec: MethodSpec) -> BatchScore:
        def score(pairs: List[tuple[Point, int]]) -> List[float]:
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


def run_comparison(task: TaskSpec, opts: Options,
                   progress: Optional['Progress'] = None) -> Dict[str, Any]:
    """Compare every method on ``task``; writes ``report.{json,md,png}`` (and ``search.json``
    when searching) to the work dir and returns the report."""
    import torch
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    init_default_scope('mmseg')
    progress = progress or Progress(0)
    t_start = progress.start
    seeds = task.seeds
    work_dir = Path(opts.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    spaces = QUICK_SEARCH_SPACES if task.spaces == 'quick' else SEARCH_SPACES
    n_runs = len(COMPARED) * len(seeds) + (len(seeds) if opts.check_budget else 0)
    if opts.search:
        searched = [m for m in COMPARED
                    if not opts.search_methods or m.name in opts.search_methods]
        grid = sum(_grid_size(spaces[m.name]) for m in searched)
        n_runs += grid + 2 * (len(seeds) - 1) * len(searched) - len(searched) * len(seeds)
        print(f'search: about {n_runs} fine-tuning runs (grids of {grid} points, finalists '
              f'with {len(seeds)} seeds, more if a grid widens) with {opts.workers} worker(s)',
              flush=True)
    progress.total += n_runs
    print(f'daft-mm comparison on {task.name} ({"quick" if opts.quick else "full"}): seeds '
          f'{list(seeds)}, budget {task.budget} iterations per method, work dir {work_dir}, '
          + (f'{opts.workers} runs side by side (1 torch thread each)' if opts.workers > 1 else
             f'{torch.get_num_threads()} torch threads'), flush=True)
    ctx = Context(task=task, work_dir=work_dir, step=progress.step, verbose=opts.verbose)
    load_pretrained(ctx)

    with RunPool(ctx, opts.workers) as pool:
        if opts.search:
            kept, earlier = _kept(opts)
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
                       + (f'; {", ".join(kept)}: kept from {earlier.get("source", "?")}'
                          if kept else ''),
                task=task.name, budget=task.budget)
            atomic_write_json(str(work_dir / 'search.json'), record, indent=1, default=str)
            source = f'--search (written to {work_dir / "search.json"})'
        else:
            record = load_recorded(Path(opts.recorded), opts.command)
            chosen = {m: Point.from_dict(p) for m, p in record['chosen'].items()}
            source = f'{opts.recorded} ({record.get("source", "?")})'
        progress.note(f'settings from {source}')

        def done(task_: Task, r: Dict[str, Any]) -> None:
            if not opts.search or not r['reused']:
                progress.step(f'{task_[0]} seed {task_[2]}: ID {r["id"]:.2f}  OOD mean '
                              f'{r["ood_mean"]:.2f}  cos {r["cosine"]:.4f}  ({r["seconds"]:.0f}s'
                              + (', finished earlier: reused)' if r['reused'] else ')'))

        tasks = [(spec.name, chosen[spec.name], seed) for seed in seeds for spec in COMPARED]
        results: Dict[str, List[Dict[str, Any]]] = {m.name: [] for m in COMPARED}
        for task_, r in zip(tasks, pool.run(tasks, done, probe=chosen['LP'])):
            results[task_[0]].append(r)
        budget_check = None
        if opts.check_budget:
            longer = pool.run([('FT', chosen['FT'], seed) for seed in seeds], done,
                              budget=2 * task.budget)
            budget_check = _budget_check(task.budget, results['FT'], longer)
            progress.note(budget_check['verdict'])
    report = _report(opts, task, chosen, source, record, results, ctx, t_start, budget_check)
    write_report(report, work_dir)
    return report


def _budget_check(budget: int, at_budget: List[Dict[str, Any]],
                  at_twice: List[Dict[str, Any]]) -> Dict[str, Any]:
    """FT's ID-val at the budget and at twice it, seed for seed: a budget too short for FT
    would favour the methods that start closer to the answer (LP, DAFT's probe phase)."""
    a = stat([r['id_val'] for r in at_budget])
    b = stat([r['id_val'] for r in at_twice])
    gain = b['mean'] - a['mean']
    spread = max(a['std'], b['std'], 0.0)
    levelled = gain <= max(1.0, spread)
    return dict(budget=budget, id_val_at_budget=a, id_val_at_twice=b, gain=gain,
                levelled=levelled,
                verdict=f'FT at its choice: ID-val {a["mean"]:.2f} at {budget} iterations, '
                        f'{b["mean"]:.2f} at {2 * budget} ({gain:+.2f}): '
                        + ('levelled off (gain within 1 point or the seed spread)' if levelled
                           else 'still improving: the budget favours fast starters'))


def _kept(opts: Options) -> tuple[Dict[str, Point], Dict[str, Any]]:
    """With ``search_methods``: the recorded choices of the other methods, and the record."""
    if not opts.search_methods:
        return {}, {}
    unknown = [m for m in opts.search_methods if m not in ORDER]
    if unknown:
        raise ValueError(f'--search-methods: unknown {unknown}; choose among {list(ORDER)}')
    earlier = load_recorded(Path(opts.recorded))
    return ({m: Point.from_dict(p) for m, p in earlier['chosen'].items()
             if m not in opts.search_methods}, earlier)


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
            t_start: float, budget_check: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    ood_names = list(next(iter(results.values()))[0]['ood'])
    classes = ctx.dataset_meta.get('classes') or ()
    return {
        'title': report_title(opts.quick, len(task.seeds), task.name),
        'premise': (task.description + '; ' if task.description else '')
        + 'every method starts from the same pretrained backbone with a fresh decode head and '
          'gets the same iteration budget',
        'metric': f'mIoU (%) on {len(classes)} classes of the ID test set\'s dataset (absent and '
                  'never-predicted classes skipped, as in mmseg IoUMetric); spread = sample std '
                  'over seeds; every setting chosen on ID-val only',
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
        'search': record.get('search', {}),
        'search_runs': record.get('runs', []),
        'task': dict(asdict(task), key=ctx.task_key, classes=list(classes)),
        'backbone_checkpoint': task.backbone,
        'provenance': provenance(task),
        'methods': summarize(results, ood_names),
        'runs': {m: [dict(r) for r in rs] for m, rs in results.items()},
        'trained_runs': ctx.trained,
        'code': dict(hash=code_hash(), commit=_commit()),
        'seconds': time.time() - t_start,
    }


def _commit() -> str:
    """The checkout's commit (with ``+changes`` when its tracked files differ), for provenance."""
    import subprocess
    from .data import REPO
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return (head or 'unknown') + ('+changes' if dirty.strip() else '')


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


def write_report(report: Dict[str, Any], out_dir: Path, stem: str = 'report') -> None:
    """``<stem>.{json,md,png}`` in ``out_dir``: the table at the choices, the budget check, each
    method's Pareto front of its search runs in words, and the figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(str(out_dir / f'{stem}.json'), report, indent=1, default=str)
    labels = {m: Point.from_dict(p).label() for m, p in report['chosen'].items()}
    table = markdown_table(report['methods'], report['ood_sets'], labels)
    fronts = front_lines(report['search_runs'])
    md = (f'# {report["title"]}\n\n{report["premise"]}. {report["metric"]}. Feature cos: '
          f'{report["cosine_similarity"]}.\n\nSettings from {report["chosen_source"]}.\n\n'
          f'{table}\n\nAblations: {", ".join(report["ablations"])}.\n\n'
          + (f'Budget: {report["budget_check"]["verdict"]}.\n\n' if report.get('budget_check')
             else '')
          + ('Pareto front of each method\'s search runs (ID mIoU, OOD mean mIoU; mean over the '
             'seeds a point ran with):\n\n' + '\n'.join(f'- {line}' for line in fronts) + '\n\n'
             if fronts else '')
          + _provenance_md(report.get('provenance'))
          + f'![{stem}]({stem}.png)\n\nTotal time: {report["seconds"]:.0f}s '
          f'({report["trained_runs"]} runs trained, the rest reused).\n')
    with atomic_write(str(out_dir / f'{stem}.md')) as f:
        f.write(md)
    plot_report(report['methods'], report['search_runs'], out_dir / f'{stem}.png',
                report['title'])
    print('\n' + table + '\n', flush=True)
    print(f'report: {out_dir / stem}.{{md,json,png}} ({report["seconds"]:.0f}s)', flush=True)
