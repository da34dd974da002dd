"""Does the demo give the same numbers now that every method's config is derived from one FT
config (``daft_mm/benchmark/variants.py``) instead of read from a config per method? Re-runs a
few (method, seed) runs of the published demo (``benchmarks/results/demo.json``) at its recorded
settings, in a fresh work dir, and writes both sets of numbers side by side.

    python benchmarks/demo_derived_check.py --out benchmarks/results/demo_derived_check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEYS = ('id_val', 'id', 'ood_mean', 'cosine')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--published', default=str(REPO / 'benchmarks' / 'results' / 'demo.json'))
    p.add_argument('--methods', nargs='+', default=['FT', 'DAFT'])
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--work-dir', default='work_dirs/demo_derived_check')
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)

    import warnings
    warnings.filterwarnings('ignore')
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    from mmengine.registry import init_default_scope
    from daft_mm.benchmark.data import DEFAULT
    from daft_mm.benchmark.demo_task import demo_task
    from daft_mm.benchmark.data import repo_commit
    from daft_mm.benchmark.methods import Point
    from daft_mm.benchmark.engine import RayCluster, run_jobs
    from daft_mm.benchmark.methods import get_method
    from daft_mm.benchmark.runs import Context, Job, load_pretrained
    init_default_scope('mmseg')
    published = json.loads(Path(args.published).read_text())
    work_dir = Path(args.work_dir).resolve()
    t0 = time.time()
    task = demo_task(DEFAULT, work_dir, print)
    ctx = Context(task=task, work_dir=work_dir, step=print, progress_bars=False)
    load_pretrained(ctx)
    chosen = {m: Point.from_dict(p) for m, p in published['chosen'].items()}
    tasks = [(m, chosen[m], args.seed) for m in args.methods]
    jobs = [Job(m, p, s, probe=chosen['LP'] if get_method(m).lp_first else None)
            for m, p, s in tasks]
    with RayCluster() as cluster:
        results = run_jobs(ctx, jobs, cluster=cluster)
    rows = []
    for (method, point, seed), now in zip(tasks, results):
        before = next(r for r in published['runs'][method] if r['seed'] == seed)
        rows.append(dict(method=method, setting=point.to_dict(), seed=seed,
                         published={k: before[k] for k in KEYS}, now={k: now[k] for k in KEYS},
                         difference={k: now[k] - before[k] for k in KEYS}))
        print(method, {k: f'{before[k]:.4f} -> {now[k]:.4f}' for k in KEYS}, flush=True)
    out = dict(rows=rows, published=args.published, commit=repo_commit(),
               seconds=time.time() - t0)
    if args.out:
        from publish_report import portable  # benchmarks/ is on sys.path when run as a script
        Path(args.out).write_text(json.dumps(portable(out, Path(args.work_dir)), indent=1) + '\n')
    return out


if __name__ == '__main__':
    main()
