"""What successive halving saves, and what it changes: the halving search against the full grid.

Two parts, both printed as a table and written to one JSON:

* ``cost``: for each task given (the embedded demo, CamVid at 300 iterations), the full grid's
  record (every grid point trained the whole budget: ``configs/demo/recorded_search.json``,
  ``benchmarks/results/camvid_300it.json``) and a halving search's record (the ``search.json`` /
  ``report.json`` of ``tools/demo.py --search`` / ``tools/compare.py --search`` at this commit).
  Per method: each search's choice and the 3-seed mean ID-val of that choice, whether the halving
  choice lies within the full grid's seed spread, the grid points, and the iterations. In all:
  ``search_ratio`` (iterations of the grid stage with halving / without) and ``total_ratio``
  (grid, finalists' seeds, LP-FT's probe stages, the table's seeds not already trained by the
  search, FT at twice the budget: the whole comparison, with / without).
* ``scale``: the same comparison (``--quick --search`` on the committed CamVid sample, with a
  longer budget so training outweighs start-up) with 2 trial slots and with 1, in fresh work dirs.

    python benchmarks/bench_search.py --camvid-halving work_dirs/compare/camvid_day_dusk \\
        --demo-halving work_dirs/demo_halving --out benchmarks/results/search_cost.json
    python benchmarks/bench_search.py --scale-only --scale-budget 60    # the scaling figure only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daft_mm.benchmark.methods import COMPARED, Point, get_method, stage_budgets  # noqa: E402

SAMPLE = REPO / 'tests' / 'samples' / 'camvid' / 'CamVid'
SPEC = REPO / 'configs' / 'camvid' / 'compare_camvid_day_dusk.py'
FULL = {'demo': REPO / 'configs' / 'demo' / 'recorded_search.json',
        'camvid': REPO / 'benchmarks' / 'results' / 'camvid_300it.json'}


def _record(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / 'search.json' if (path / 'search.json').is_file() else path / 'report.json'
    from daft_mm.benchmark.experiment import load_recorded
    rec = load_recorded(path)
    rec['path'] = str(path)
    raw = json.loads(path.read_text())
    rec['budget'] = rec.get('budget') or raw.get('budget_iterations') or 300
    rec['seeds'] = raw.get('seeds') or [0, 1, 2]
    return rec


def _chosen_stats(search: Dict[str, Any]) -> Dict[str, Any]:
    """The chosen point's ID-val per seed (it is a finalist: every seed ran)."""
    chosen = Point.from_dict(search['chosen'])
    row = next(g for g in search['grid'] if Point.from_dict(g) == chosen)
    values = [float(v) for v in row['id_val'].values()]
    return dict(setting=chosen.label(), mean=statistics.fmean(values),
                std=statistics.stdev(values) if len(values) > 1 else 0.0, seeds=len(values))


def _length(method: str, budget: int) -> int:
    spec = get_method(method)
    b = stage_budgets(spec, budget)
    return b['ft'] if spec.lp_first else sum(b.values())


def _full_iterations(search: Dict[str, Any], method: str, budget: int, seeds: int
                     ) -> Dict[str, int]:
    """A full-grid search's cost: every point the first seed's whole stage, the finalists the
    other seeds."""
    length = _length(method, budget)
    return dict(grid=len(search['grid']) * length,
                finalists=len(search['finalists']) * (seeds - 1) * length)


def compare_task(name: str, full_path: Path, halving_path: Path) -> Dict[str, Any]:
    full, halved = _record(full_path), _record(halving_path)
    budget, seeds = int(full['budget']), len(full['seeds'])
    if int(halved['budget']) != budget:
        raise SystemExit(f'{name}: the two records are for budgets {budget} and '
                         f'{halved["budget"]}')
    rows, totals = {}, dict(full_grid=0, halving_grid=0, full_search=0, halving_search=0)
    for m in COMPARED:
        f_search, h_search = full['search'][m.name], halved['search'][m.name]
        f, h = _chosen_stats(f_search), _chosen_stats(h_search)
        f_cost = _full_iterations(f_search, m.name, budget, seeds)
        h_cost = h_search.get('iterations') or _full_iterations(h_search, m.name, budget, seeds)
        within = h['mean'] >= f['mean'] - f['std'] - 1e-9
        rows[m.name] = dict(full=f, halving=h, same_choice=f['setting'] == h['setting'],
                            within_seed_spread=within,
                            grid_points=dict(full=len(f_search['grid']),
                                             halving=h_search.get('points',
                                                                  len(h_search['grid']))),
                            iterations=dict(full=f_cost, halving=h_cost),
                            search_ratio=h_cost['grid'] / f_cost['grid'])
        totals['full_grid'] += f_cost['grid']
        totals['halving_grid'] += h_cost['grid']
        totals['full_search'] += f_cost['grid'] + f_cost['finalists']
        totals['halving_search'] += h_cost['grid'] + h_cost['finalists']
    # the fixed part, the same with and without halving: LP-FT's probe stages (one per seed),
    # FT at twice the budget (the budget check); the table's seeds are the chosen finalists'
    fixed = seeds * stage_budgets(get_method('LP-FT'), budget)['lp'] + seeds * 2 * budget
    return dict(budget=budget, seeds=seeds, full_record=str(Path(full_path).relative_to(REPO)),
                halving_record=f'<work_dir>/{Path(halved["path"]).name} of: '
                               f'{halved.get("source") or "?"}', methods=rows,
                search_ratio=totals['halving_grid'] / totals['full_grid'],
                total_ratio=(totals['halving_search'] + fixed) / (totals['full_search'] + fixed),
                iterations=dict(totals, fixed=fixed),
                ft_runs=dict(full=(totals['full_search'] + fixed) / budget,
                             halving=(totals['halving_search'] + fixed) / budget),
                all_within_seed_spread=all(r['within_seed_spread'] for r in rows.values()))


def scale(budget: int, slots: List[int]) -> Dict[str, Any]:
    """The same comparison with each number of trial slots, in fresh work dirs."""
    from daft_mm.mm.datasets.camvid_splits import write_day_dusk_splits
    tmp = Path(tempfile.mkdtemp(prefix='bench_search_'))
    root = tmp / 'CamVid'
    shutil.copytree(SAMPLE, root)
    write_day_dusk_splits(root)
    out = {}
    try:
        for n in slots:
            work = tmp / f'work_{n}'
            t0 = time.time()
            proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'compare.py'), str(SPEC),
                                   '--quick', '--search', '--budget', str(budget),
                                   '--concurrent-trials', str(n), '--work-dir', str(work),
                                   '--cfg-options', f'data_root={root}'],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f'compare.py failed:\n{proc.stdout[-2000:]}\n'
                                 f'{proc.stderr[-2000:]}')
            report = json.loads((work / 'report.json').read_text())
            out[str(n)] = dict(wall_s=round(time.time() - t0, 1),
                               trained_iterations=report['cost']['trained_iterations'])
            print(f'{n} trial slot(s): {out[str(n)]["wall_s"]:.1f} s', flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = min(slots), max(slots)
    return dict(command=f'tools/compare.py {SPEC.relative_to(REPO)} --quick --search --budget '
                        f'{budget} --concurrent-trials N (committed CamVid sample)',
                slots=out, speedup=out[str(a)]['wall_s'] / out[str(b)]['wall_s'])


def _table(name: str, t: Dict[str, Any]) -> str:
    lines = [f'{name} at {t["budget"]} iterations: search_ratio {t["search_ratio"]:.2f}, '
             f'total_ratio {t["total_ratio"]:.2f} ({t["ft_runs"]["halving"]:.1f} vs '
             f'{t["ft_runs"]["full"]:.1f} FT runs)', '',
             '| method | full grid: choice, ID-val (3 seeds) | halving: choice, ID-val (3 seeds) '
             '| within spread | points full / halving | search_ratio |',
             '|---|---|---|---|---|---|']
    for m, r in t['methods'].items():
        f, h = r['full'], r['halving']
        lines.append(f'| {m} | {f["setting"]}: {f["mean"]:.2f} ± {f["std"]:.2f} | '
                     f'{h["setting"]}: {h["mean"]:.2f} ± {h["std"]:.2f} | '
                     f'{"yes" if r["within_seed_spread"] else "NO"} | '
                     f'{r["grid_points"]["full"]} / {r["grid_points"]["halving"]} | '
                     f'{r["search_ratio"]:.2f} |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--demo-halving', type=Path, help='work dir or search.json of the demo\'s '
                   'halving search (tools/demo.py --search)')
    p.add_argument('--camvid-halving', type=Path, help='work dir or search.json of CamVid\'s '
                   'halving search (tools/compare.py ... --search)')
    p.add_argument('--scale-budget', type=int, default=60)
    p.add_argument('--scale-only', action='store_true')
    p.add_argument('--no-scale', action='store_true')
    p.add_argument('--out', type=Path)
    args = p.parse_args(argv)
    from daft_mm.benchmark.data import repo_commit
    result: Dict[str, Any] = dict(commit=repo_commit(), machine=dict(
        cpus=os.cpu_count(), platform=platform.platform()), tasks={})
    if args.out and args.out.is_file():  # keep what an earlier call measured
        result = dict(json.loads(args.out.read_text()), commit=result['commit'])
    if not args.scale_only:
        for name, halving in (('demo', args.demo_halving), ('camvid', args.camvid_halving)):
            if halving is not None:
                result['tasks'][name] = compare_task(name, FULL[name], halving)
                print(_table(name, result['tasks'][name]) + '\n', flush=True)
    if not args.no_scale:
        result['scale'] = scale(args.scale_budget, [1, 2])
        print(f'2 slots vs 1: {result["scale"]["speedup"]:.2f}x faster', flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + '\n')
    return result


if __name__ == '__main__':
    main()
