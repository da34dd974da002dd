"""Evaluate a segmentor (mIoU) or detector (mAP) under the common corruptions at severities 1-5.

The benchmark of Hendrycks & Dietterich (ImageNet-C), as used for COCO-C / Cityscapes-C and by
mmdet's robustness tool: the test set is evaluated clean, then once per corruption and severity with
``ImageCorruption`` inserted right after the image is loaded. Reported, as in that literature:

* ``P``: the clean metric;
* ``mPC``: mean performance under corruption (mean over the corruptions and severities run);
* ``rPC``: relative performance under corruption, ``mPC / P`` (in %).

Writes ``robustness.json`` (every number, updated after each evaluation so ``--resume`` can skip
what is done), ``robustness.md`` (table) and ``robustness.png`` (metric vs severity) into the work
dir, each atomically (a kill leaves the previous file whole). The JSON records what its numbers
depend on (the config with its --cfg-options, the checkpoint's bytes, the metric, the seed):
``--resume`` refuses to mix results of another run into it, and an existing result of another run
is never overwritten without ``--overwrite``. E.g.::

    python tools/test_robustness.py configs/ood/acdc_fog.py work_dirs/daft/iter_40000.pth \
        --corruptions noise blur --severities 1 3 5
"""
from __future__ import annotations

import argparse
import copy
import os
import os.path as osp
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from mmengine.config import DictAction

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from daft_mm.mm.datasets.transforms import CORRUPTION_GROUPS
    p = argparse.ArgumentParser(
        description='Test a segmentor / detector under common corruptions (daft-mm)',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='corruption groups: ' + '; '.join(
            f'{k}: {", ".join(v)}' for k, v in CORRUPTION_GROUPS.items() if k != 'all'))
    p.add_argument('config', help='test config file path')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--corruptions', nargs='+', default=['benchmark'],
                   help='groups (all, benchmark, noise, blur, weather, digital, holdout) and/or '
                   'corruption names (default: benchmark, the 15 standard ones)')
    p.add_argument('--severities', nargs='+', type=int, default=[1, 2, 3, 4, 5],
                   choices=[1, 2, 3, 4, 5], help='severities to test (default: 1 2 3 4 5)')
    p.add_argument('--work-dir', help='where results go (default: work_dirs/robustness/<config>)')
    p.add_argument('--metric', help='metric key to report (default: mIoU for segmentation; '
                   'coco/bbox_mAP or pascal_voc/mAP for detection)')
    p.add_argument('--seed', type=int, default=0,
                   help='corruption seed: every image is corrupted the same way for every model '
                   '(default: %(default)s)')
    p.add_argument('--skip-clean', action='store_true',
                   help='do not evaluate clean data (P and rPC are then missing)')
    p.add_argument('--resume', action='store_true',
                   help='keep the results in <work-dir>/robustness.json and only run what is '
                   'missing; refused if they came from another config, --cfg-options, '
                   'checkpoint, --metric or --seed')
    p.add_argument('--overwrite', action='store_true',
                   help='replace an existing <work-dir>/robustness.json (default: refuse, so that '
                   'the results of another run are never lost silently)')
    p.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value. data_root=PATH is applied to every '
        'dataloader')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                   help='job launcher')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


from daft_mm.mm.robustness import (PerClassTables, load_previous, pick_metric,  # noqa: E402,E501
                                    plot, provenance, summarize, table, with_corruption)


# ------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)

    import daft_mm.mm  # noqa: F401  (registers ImageCorruption, DAFTModel; applies compat fixes)
    from daft_mm.mm.cli import (TEST_LOADERS, close_distributed, detect_task, format_metrics,
                                load_config)
    from daft_mm.mm.datasets.transforms import corruption_names
    from mmengine.dist import is_main_process
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner, TestLoop

    from daft_mm.utils import atomic_write, atomic_write_json

    corruptions = corruption_names(args.corruptions)  # fails early on a typo
    severities = sorted(set(args.severities))
    if not osp.isfile(osp.expanduser(args.checkpoint)) and '://' not in args.checkpoint:
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist')
    work_dir = args.work_dir or osp.join(
        'work_dirs', 'robustness', osp.splitext(osp.basename(args.config))[0])
    cfg = load_config(args.config, args.cfg_options, work_dir=work_dir, launcher=args.launcher,
                      used_loaders=TEST_LOADERS)
    task = detect_task(cfg)
    cfg.load_from = args.checkpoint
    if cfg.get('test_dataloader') is None or cfg.get('test_evaluator') is None:
        raise ValueError(f'{args.config} has no test_dataloader / test_evaluator to evaluate with')
    with_corruption(cfg.test_dataloader, corruptions[0], 1, args.seed)  # pipeline check, early

    out_json = osp.join(work_dir, 'robustness.json')
    prov = provenance(cfg, args.checkpoint, args.metric, args.seed)
    results: Dict[str, Any] = dict(config=args.config, checkpoint=args.checkpoint, task=task,
                                   metric=args.metric, seed=args.seed, clean=None, corrupted={},
                                   all_metrics={}, provenance=prov)
    if args.resume and args.overwrite:
        raise ValueError('--resume keeps the results of robustness.json, --overwrite replaces '
                         'them: pass one of them')
    if args.resume and osp.isfile(out_json):
        old = load_previous(out_json, prov)
        results.update(clean=old.get('clean'), corrupted=old.get('corrupted', {}),
                       all_metrics=old.get('all_metrics', {}), metric=old.get('metric'))
    elif osp.isfile(out_json) and not args.overwrite:
        raise FileExistsError(
            f'{out_json} exists (results of an earlier run); this run would overwrite it. Fix: '
            '--resume to complete that run (checked to be the same config, checkpoint and '
            'metric), --overwrite to replace it, or another --work-dir')

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)

    def save() -> None:
        if not is_main_process():
            return
        results['summary'] = summarize(results)
        atomic_write_json(out_json, results, indent=1)

    tables = PerClassTables()
    tables.attach(runner.logger)

    def record(key: str, metrics: Mapping[str, Any]) -> float:
        results['all_metrics'][key] = {k: float(v) for k, v in metrics.items()
                                       if isinstance(v, (int, float))}
        per_class = tables.pop()
        if per_class:
            results.setdefault('per_class', {})[key] = per_class[-1]
        if results['metric'] is None:
            results['metric'] = pick_metric(metrics, task, args.metric)
        elif results['metric'] not in metrics:
            raise KeyError(f'metric {results["metric"]!r} missing from {sorted(metrics)}')
        return float(metrics[results['metric']])

    # The clean pass goes through Runner.test(): it loads the checkpoint and runs the before_run
    # hooks once; the corrupted passes reuse the loaded model with a new dataloader each.
    todo = [(c, s) for c in corruptions for s in severities
            if str(s) not in results['corrupted'].get(c, {})]
    t0 = time.time()
    if not args.skip_clean and results['clean'] is None:
        results['clean'] = record('clean', runner.test())
        save()
        runner.logger.info(f'[robustness] clean {results["metric"]}: {results["clean"]:.2f}')
        opened = False
    else:  # what Runner.test() does before its loop: hooks' before_run, load the checkpoint
        runner.call_hook('before_run')
        runner.load_or_resume()
        opened = True
    for i, (corruption, severity) in enumerate(todo, 1):
        loop = TestLoop(runner, with_corruption(cfg.test_dataloader, corruption, severity,
                                                args.seed), copy.deepcopy(cfg.test_evaluator))
        value = record(f'{corruption}/{severity}', loop.run())
        results['corrupted'].setdefault(corruption, {})[str(severity)] = value
        save()
        elapsed = time.time() - t0
        runner.logger.info(
            f'[robustness] {i}/{len(todo)} {corruption} severity {severity}: '
            f'{results["metric"]} {value:.2f} (elapsed {elapsed:.0f}s, ETA '
            f'{elapsed / i * (len(todo) - i):.0f}s)')
    # Order the table as asked, whatever order a resumed file had.
    results['corrupted'] = {c: {str(s): results['corrupted'][c][str(s)] for s in severities
                                if str(s) in results['corrupted'].get(c, {})}
                            for c in corruptions if c in results['corrupted']}
    save()
    if opened:
        runner.call_hook('after_run')
    if is_main_process():
        text = table(results, severities)
        with atomic_write(osp.join(work_dir, 'robustness.md')) as f:
            f.write(text + '\n')
        plot(results, severities, osp.join(work_dir, 'robustness.png'))
        print(text, flush=True)
        print(f'[daft-mm] robustness: {out_json}, robustness.md, robustness.png in {work_dir}',
              flush=True)
        if results.get('clean') is not None:
            print(f'[daft-mm] {task} clean metrics: '
                  f'{format_metrics(results["all_metrics"]["clean"])}', flush=True)
    close_distributed()
    return results


if __name__ == '__main__':
    main()
