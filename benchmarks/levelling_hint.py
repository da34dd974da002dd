"""Has FT levelled off at a task's budget? One FT run at a longer budget, trained in rungs that
each continue the last, with its ID-val score at every rung: a hint before a study spends its
hours at a budget FT has not finished (one seed; the study's budget check runs every seed).

    python benchmarks/levelling_hint.py configs/camvid/compare_camvid_boxes_day_dusk_faster-rcnn.py \
        --lr 0.02 --budget 4000 --every 500 --work-dir work_dirs/levelling \
        --cfg-options data_root=data/CamVid

The rungs are the comparison's own (:func:`daft_mm.benchmark.runs.run_trial`): stop it at any
time and run it again, it goes on from the last rung; the scores at the rungs are within the one
schedule of ``--budget`` iterations (poly decay to its end), not runs of their own budgets. The
last rung is the FT run of that budget and seed (the same key): with ``--budget`` twice the task's
and ``--lr`` FT's choice, the study's budget check reuses it. Writes ``levelling.json`` in the
work dir, with the data's and backbone's provenance.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daft_mm.utils import atomic_write_json  # noqa: E402


def rungs(budget: int, every: int) -> List[int]:
    if every < 1 or budget < 1:
        raise SystemExit(f'--budget ({budget}) and --every ({every}) must be >= 1')
    stops = list(range(every, budget, every))
    return stops + [budget]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='the comparison config (its compare dict is the task)')
    p.add_argument('--lr', type=float, required=True, help="FT's learning rate")
    p.add_argument('--budget', type=int, required=True, help='the longer budget (iterations)')
    p.add_argument('--every', type=int, default=500, help='iterations between ID-val scores')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--work-dir', required=True)
    p.add_argument('--threads', type=int, default=None,
                   help="torch threads (default torch's own; 1 beside other runs on a shared "
                   'machine, as the comparison\'s trials use)')
    p.add_argument('--max-images', type=int, default=None,
                   help='the first N images of every set (a quick check, not a hint)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    args = p.parse_args(argv)
    stops = rungs(args.budget, args.every)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401  (registers the models and hooks)
    from daft_mm.benchmark.methods import Point
    from daft_mm.benchmark.runs import Context, Job, load_pretrained, run_trial
    from daft_mm.benchmark.scoring import SCOPES
    from daft_mm.benchmark.task import task_from_config
    task = task_from_config(args.config, options=args.cfg_options,
                            **({'max_images': args.max_images} if args.max_images else {}))
    init_default_scope(SCOPES[task.kind])
    work_dir = Path(args.work_dir).resolve()
    ctx = Context(task=task, work_dir=work_dir, step=print)
    load_pretrained(ctx, eval_sets=False)  # ID-val now; the other sets at the last rung
    out: Dict[str, Any] = dict(task=task.name, config=args.config, lr=args.lr, seed=args.seed,
                               budget=args.budget, task_budget=task.budget, id_val=[])
    start = 0
    for stop in stops:
        job = Job('FT', Point(lr=args.lr), args.seed, iters=stop, start=start,
                  budget=args.budget)
        result = run_trial(ctx, job)
        out['id_val'].append(dict(iters=stop, id_val=result['id_val'],
                                  seconds=result.get('seconds'), reused=result['reused']))
        print(f'[levelling] FT lr {args.lr} seed {args.seed}: ID-val {result["id_val"]:.2f} at '
              f'{stop} of {args.budget} it.' + (' (reused)' if result['reused'] else ''),
              flush=True)
        start = stop
    out['final'] = {k: result.get(k) for k in ('id_val', 'id', 'ood', 'ood_mean')}
    # where the data and backbone came from, without this machine's paths (as a published report)
    from daft_mm.benchmark.task import provenance
    from publish_report import portable
    out['provenance'] = portable(provenance(task), work_dir)
    atomic_write_json(str(work_dir / 'levelling.json'), out, indent=1, default=str)
    return out


if __name__ == '__main__':
    main()
