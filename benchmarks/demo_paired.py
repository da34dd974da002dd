"""What BN conversion does at equal settings, on the embedded benchmark: paired runs.

A search picks each method's setting on ID-val; comparing two methods at their own choices mixes
the effect of the method with the effect of the setting. Here each pair differs in BN conversion
alone (same backbone LR, head ratio, head scope, seeds, budget): DAFT vs DAFT w/o conversion at
the settings on DAFT's (ID, OOD) front of the recorded search, and conversion only vs FT at the
learning rates conversion only's search ended on. Nothing is chosen here; every run is a cached
run of ``tools/demo.py`` (same keys), so points the search or the table already trained are
reused.

    python benchmarks/demo_paired.py --work-dir work_dirs/demo --out benchmarks/results/demo_paired.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daft_mm.benchmark.methods import Point  # noqa: E402

#: (method with conversion, method without, setting)
PAIRS: Tuple[Tuple[str, str, Point], ...] = (
    ('DAFT', 'DAFT w/o conversion', Point(lr=0.001, ratio=1000.0, scope='new_modules')),
    ('DAFT', 'DAFT w/o conversion', Point(lr=0.01, ratio=100.0, scope='new_modules')),
    ('DAFT', 'DAFT w/o conversion', Point(lr=0.1, ratio=10.0, scope='new_modules')),
    ('conversion only', 'FT', Point(lr=0.3)),
    # 0.3 widened by its step 3, bit for bit (0.8999999999999999): a cached run's key holds it
    ('conversion only', 'FT', Point(lr=0.3 * 3.0)),
)


def _stat(values: Sequence[float]) -> Dict[str, float]:
    return {'mean': statistics.fmean(values),
            'std': statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: Sequence[str] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default='work_dirs/demo')
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--concurrent-trials', type=int, default=None,
                   help='trials at once on the local Ray (default: one per core)')
    p.add_argument('--out', default=None, help='write the pairs as JSON here')
    args = p.parse_args(argv)

    import warnings
    warnings.filterwarnings('ignore')
    from mmengine.registry import init_default_scope

    import daft_mm.mm  # noqa: F401
    from daft_mm.benchmark.data import DEFAULT
    from daft_mm.benchmark.demo_task import demo_task
    from daft_mm.benchmark.experiment import Progress
    from daft_mm.benchmark.engine import RayCluster, run_jobs
    from daft_mm.benchmark.runs import Context, Job, load_pretrained
    init_default_scope('mmseg')
    work_dir = Path(args.work_dir).resolve()
    seeds = list(range(args.seeds))
    tasks = [(name, point, seed) for with_, without, point in PAIRS
             for name in (with_, without) for seed in seeds]
    progress = Progress(2 + len(tasks))
    task = demo_task(DEFAULT, work_dir, progress.step)
    ctx = Context(task=task, work_dir=work_dir, step=progress.step)
    load_pretrained(ctx)
    jobs = [Job(name, point, seed) for name, point, seed in tasks]  # no LP-FT among the pairs
    with RayCluster() as cluster:
        results = run_jobs(ctx, jobs, cluster=cluster, concurrent=args.concurrent_trials,
                           on_result=lambda j, r: progress.step(
                               f'{j.label()}: ID {r["id"]:.2f} OOD mean {r["ood_mean"]:.2f}'
                               + (' (reused)' if r['reused'] else '')))
    by_task = dict(zip(tasks, results))
    rows: List[Dict[str, Any]] = []
    for with_, without, point in PAIRS:
        row: Dict[str, Any] = {'setting': point.to_dict(), 'with': with_, 'without': without}
        for side, name in (('with', with_), ('without', without)):
            runs = [by_task[(name, point, s)] for s in seeds]
            row[side + '_id'] = _stat([r['id'] for r in runs])
            row[side + '_ood_mean'] = _stat([r['ood_mean'] for r in runs])
        # paired by seed: the same seed draws the same fresh head and data order in both runs
        row['delta_id'] = _stat([by_task[(with_, point, s)]['id']
                                 - by_task[(without, point, s)]['id'] for s in seeds])
        row['delta_ood_mean'] = _stat([by_task[(with_, point, s)]['ood_mean']
                                       - by_task[(without, point, s)]['ood_mean'] for s in seeds])
        rows.append(row)
    print('| pair | setting | ID with / without | OOD mean with / without | '
          'conversion adds (ID, OOD), paired by seed |')
    print('|---|---|---|---|---|')
    for r in rows:
        f = lambda s: f'{s["mean"]:.1f} ± {s["std"]:.1f}'  # noqa: E731
        print(f'| {r["with"]} vs {r["without"]} | {Point.from_dict(r["setting"]).label()} | '
              f'{f(r["with_id"])} / {f(r["without_id"])} | {f(r["with_ood_mean"])} / '
              f'{f(r["without_ood_mean"])} | {r["delta_id"]["mean"]:+.1f} ± '
              f'{r["delta_id"]["std"]:.1f}, {r["delta_ood_mean"]["mean"]:+.1f} ± '
              f'{r["delta_ood_mean"]["std"]:.1f} |')
    report = {'seeds': seeds, 'budget_iterations': DEFAULT.budget, 'pairs': rows,
              'backbone_checkpoint': ctx.task.backbone,
              'note': 'each pair differs in BN conversion alone; settings are points of the '
                      'recorded ID-val search, nothing is chosen here'}
    if args.out:
        from publish_report import portable  # benchmarks/ is on sys.path when run as a script
        Path(args.out).write_text(json.dumps(portable(report, Path(args.work_dir)), indent=1))
    return report


if __name__ == '__main__':
    main()
