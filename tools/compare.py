"""Compare FT, LP, LP-FT, DAFT and DAFT's ablations on your own segmentation or detection config.

Every method's config is derived from CONFIG (your FT config: model, training set, pipelines,
schedule); each starts from the same pretrained backbone with a fresh decode head (detection: a
fresh neck and heads), gets the same iteration budget and seeds, and has its setting chosen on
ID-val only (grids widened at their edges, pruned by successive halving, finalists re-run with
every seed). ID test is CONFIG's test set; OOD sets are named dataset configs and common
corruptions of the ID test images. Scores: mIoU, or a detection config's own mmdet metric (bbox
mAP). Trials run on Ray Tune: a local Ray by default (one trial per core, or per GPU), a running
cluster with --address. Runs are cached under the work dir: stop at any time and run the same
command again to pick up where it stopped.

    python tools/compare.py configs/camvid/compare_camvid_day_dusk.py --search \\
        --cfg-options data_root=data/CamVid
    python tools/compare.py configs/camvid/compare_camvid_boxes_day_dusk.py --search \\
        --cfg-options data_root=data/CamVid            # detection: RetinaNet, mmdet's bbox mAP
    python tools/compare.py MY_CONFIG.py --search --backbone my_backbone.pth \\
        --id-val configs/my_val.py --ood night=configs/my_night.py --ood fog=configs/my_fog.py

A config may hold its specification as `compare = dict(backbone=..., id_val=..., ood=dict(...),
corruptions=..., budget=..., seeds=...)` (see configs/camvid/compare_camvid_day_dusk.py); flags
override it. Writes report.{json,md,png} (the table at the ID-val choices, every search run and
each method's Pareto front of ID vs OOD mean) and, with --search, search.json.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from mmengine.config import DictAction  # noqa: E402

from daft_mm.benchmark.experiment import (ORDER, Options, add_engine_args,  # noqa: E402
                                          check_engine_args, engine_options, run_comparison)
from daft_mm.benchmark.methods import method_name  # noqa: E402
from daft_mm.benchmark.task import InputError, task_from_config  # noqa: E402

#: --quick: a smoke test of the whole path in seconds, not a benchmark.
QUICK = dict(budget=4, max_images=4, seeds=(0, ))


def _named(text: str) -> tuple:
    name, sep, config = text.partition('=')
    if not sep or not name or not config:
        raise argparse.ArgumentTypeError(f'{text!r}: give NAME=CONFIG, e.g. dusk=configs/ood/'
                                         'camvid_dusk.py')
    return name, config


def _corruption(text: str) -> tuple:
    name, _, severity = text.partition(':')
    try:
        return name, int(severity or 3)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: give NAME or NAME:SEVERITY, e.g. fog:3'
                                         ) from None


def _method(text: str) -> str:
    try:
        return method_name(text)
    except KeyError as err:
        raise argparse.ArgumentTypeError(err.args[0]) from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('config', help='your fine-tuning (FT) config')
    p.add_argument('--backbone', help='the pretrained backbone checkpoint every method starts '
                   'from (default: compare.backbone in the config)')
    p.add_argument('--backbone-prefix', default=None,
                   help='its key prefix in the checkpoint (default backbone.; "" for a checkpoint '
                   'that is the backbone\'s own state dict)')
    p.add_argument('--id-val', metavar='CONFIG', help='a config whose test set is the ID '
                   'validation data every choice is made on (default: the config\'s val set, '
                   'which must not be its test set)')
    p.add_argument('--ood', type=_named, action='append', default=[], metavar='NAME=CONFIG',
                   help='an OOD test set: a config whose test_dataloader.dataset it is '
                   '(repeatable; replaces compare.ood)')
    p.add_argument('--corruptions', type=_corruption, nargs='*', default=None,
                   metavar='NAME[:SEVERITY]', help='corruptions of the ID test images, each '
                   'an OOD set (default: compare.corruptions; none: pass the flag alone)')
    p.add_argument('--budget', type=int, default=None,
                   help='training iterations of every method (LP-FT: both stages together)')
    p.add_argument('--seeds', type=int, default=None, help='seeds per method (default 3)')
    p.add_argument('--batch-size', type=int, default=None, help='training batch size')
    p.add_argument('--search', action='store_true',
                   help='choose every method\'s setting on ID-val first (needed once per task)')
    p.add_argument('--recorded', default=None, metavar='JSON',
                   help='without --search: the choices of an earlier comparison (its '
                   'search.json or report.json, e.g. benchmarks/results/camvid.json); the report '
                   'says when they were made for another task or budget')
    p.add_argument('--rows', nargs='+', metavar='METHOD', default=None, type=_method,
                   help='only these rows of the table (e.g. --recorded CHOICES --backbone OTHER '
                   '--rows FT DAFT: the same choices from another pretraining run)')
    p.add_argument('--search-methods', nargs='+', metavar='METHOD', default=None,
                   type=_method, help=f'with --search: search only these ({", ".join(ORDER)}; '
                   'any case, or the recipe names of configs and train_cls.py: ft, lp, lp-ft, '
                   'daft, daft-no-convert, daft-convert-only) and keep the other choices from '
                   '--recorded')
    p.add_argument('--protocol', choices=('grid', 'paper'), default='grid',
                   help='DAFT\'s search: the joint grid, or the paper\'s two stages')
    p.add_argument('--no-budget-check', action='store_true',
                   help='skip FT at twice the budget (the check that the budget suffices)')
    p.add_argument('--quick', action='store_true',
                   help=f'a smoke run of the whole path: {QUICK["budget"]} iterations, the first '
                   f'{QUICK["max_images"]} images of every set (training too), 1 seed, one '
                   'setting per method (benchmarks/results/quick_compare.json times it on the '
                   'committed CamVid sample)')
    add_engine_args(p)
    p.add_argument('--work-dir', default=None,
                   help='runs, search.json and the report (default work_dirs/compare/<name>)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                   help='options of every run, as for tools/train.py (e.g. data_root=...)')
    p.add_argument('--verbose', action='store_true', help='mmengine INFO logs of every run')
    args = p.parse_args(argv)
    check_engine_args(p, args)
    if not args.search and not args.recorded:
        p.error('there are no recorded choices for your task yet: pass --search (or --recorded '
                'SEARCH_JSON from an earlier search)')
    if args.search_methods and not (args.search and args.recorded):
        p.error('--search-methods needs --search and --recorded (the other methods\' choices)')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings('ignore')  # mmengine/mmseg deprecation chatter; errors still raise
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption, CamVid)
    overrides: Dict[str, Any] = dict(budget=args.budget, batch_size=args.batch_size,
                                     backbone_prefix=args.backbone_prefix)
    if args.seeds is not None:
        overrides['seeds'] = tuple(range(args.seeds))
    if args.rows:
        overrides['only'] = tuple(args.rows)
    if args.quick:
        overrides.update(budget=args.budget or QUICK['budget'], spaces='quick',
                         max_images=QUICK['max_images'],
                         seeds=overrides.get('seeds', QUICK['seeds']))
    try:
        task = task_from_config(args.config, backbone=args.backbone, id_val=args.id_val,
                                ood=dict(args.ood) or None, corruptions=args.corruptions,
                                options=args.cfg_options, **overrides)
    except (ValueError, FileNotFoundError) as err:  # InputError too: a task that cannot be run
        _refuse(err)
    work_dir = args.work_dir or str(Path('work_dirs') / 'compare' / task.name)
    command = 'tools/compare.py ' + ' '.join(shlex.quote(a) for a in (argv or sys.argv[1:])
                                             if a not in ('--search', ))
    opts = Options(quick=args.quick, search=args.search, protocol=args.protocol,
                   work_dir=work_dir, recorded=args.recorded, verbose=args.verbose,
                   search_methods=args.search_methods, check_budget=not args.no_budget_check,
                   command=command, **engine_options(args))
    try:
        return run_comparison(task, opts)
    except InputError as err:  # what the user gave, found before any run started
        _refuse(err)
    except KeyboardInterrupt:  # the trials stopped with Ray; finished ones are cached
        print(f'\ncompare.py: interrupted. Finished trials are kept in {work_dir}: the same '
              'command continues from them.', file=sys.stderr)
        raise SystemExit(130) from None


def _refuse(err: Exception) -> None:
    """A usage error: the message, no traceback (nothing has trained yet)."""
    print(f'compare.py: error: {err}', file=sys.stderr)
    raise SystemExit(2)


if __name__ == '__main__':
    main()
