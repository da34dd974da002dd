"""What does one training iteration of a detection comparison cost on this machine, and what
would a cheaper version of the task save? A study is some hundred thousand FT iterations
(``tools/compare.py`` prints its estimate), so the seconds per iteration decide whether it fits.

Times FT training steps of a detection config (the real mmengine Runner on its own data, BN in
train mode, mmengine's ``train/time``) for each variant, a set of ``--cfg-options`` on top of the
config, in interleaved rounds so that a shared machine's drift hits every variant alike. Prints
the median seconds per iteration and, with ``--study-iterations``, the core-hours of a study of
that many iterations run one trial per core.

    python benchmarks/bench_detection_step.py \\
        configs/camvid/compare_camvid_boxes_day_dusk_faster-rcnn.py \\
        --cfg-options data_root=data/CamVid --threads 1 --study-iterations 420000 \\
        --variant batch4 train_dataloader.batch_size=4 \\
        --variant 240x180 'train_dataloader.dataset.pipeline.2.scale=(240,180)'
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_options(pairs: Sequence[str]) -> Dict[str, Any]:
    """``KEY=VALUE`` pairs, each value read as a Python literal where it is one."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep or not key:
            raise SystemExit(f'{pair!r} is not KEY=VALUE (e.g. train_dataloader.batch_size=4)')
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def missing_keys(config: str, common: Mapping[str, Any], options: Mapping[str, Any]
                 ) -> List[str]:
    """The keys of ``options`` that name nothing in the config: mmengine would add them, and
    the variant would time the config itself under another name."""
    from daft_mm.mm.cli import load_config
    cfg = load_config(config, dict(common), work_dir='unused').to_dict()
    missing = []
    for key in options:
        node: Any = cfg
        for part in key.split('.'):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                missing.append(key)
                break
    return missing


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('config', help='a detection FT config (e.g. a compare_*.py task)')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='options of every variant (e.g. data_root=...)')
    p.add_argument('--variant', nargs='+', action='append', default=[],
                   metavar=('NAME', 'KEY=VALUE'),
                   help='a named variant: its options on top of the config (repeatable; '
                        '"config" is the config as it is, always timed)')
    p.add_argument('--rounds', type=int, default=None, help='default 3 (--quick: 1)')
    p.add_argument('--iters', type=int, default=None, help='timed iterations per run '
                                                           '(default 20; --quick: 2)')
    p.add_argument('--warmup', type=int, default=None, help='default 3 (--quick: 1)')
    p.add_argument('--threads', type=int, default=None,
                   help="torch threads (a study's trial has 1; default torch's own)")
    p.add_argument('--study-iterations', type=int, default=None,
                   help='a study of this many FT iterations: print its core-hours per variant')
    p.add_argument('--quick', action='store_true', help='one round of 2 iterations (the tests)')
    p.add_argument('--out', default='benchmarks/results/detection_step.json')
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    iters = args.iters or (2 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    common = parse_options(args.cfg_options)
    variants: Dict[str, Dict[str, Any]] = {'config': {}}
    for name, *pairs in args.variant:
        if name in variants:
            p.error(f'variant {name!r} is given twice')
        variants[name] = parse_options(pairs)

    import torch

    import daft_mm  # noqa: F401  (registers the project's modules)
    from bench_train_step import time_steps
    for name, opts in variants.items():
        missing = missing_keys(args.config, common, opts)
        if missing:
            p.error(f'variant {name!r}: {", ".join(missing)} names nothing in {args.config}; '
                    'a variant changes keys the config has (e.g. '
                    'train_dataloader.batch_size=4, train_dataloader.dataset.pipeline.2.scale='
                    '(240,180))')
    if args.threads:
        torch.set_num_threads(args.threads)
    steps: Dict[str, List[float]] = {name: [] for name in variants}
    round_medians: Dict[str, List[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                times = time_steps(args.config, {**common, **variants[name]},
                                   Path(tmp) / f'{name}_{r}', iters, warmup)['step_times']
                steps[name].extend(times)
                round_medians[name].append(statistics.median(times))
                print(f'round {r + 1}/{rounds} {name}: median '
                      f'{statistics.median(times):.3f} s/iteration', flush=True)

    median = {name: statistics.median(t) for name, t in steps.items()}
    summary: Dict[str, Any] = {
        'config': os.path.relpath(os.path.abspath(args.config), REPO),
        'machine': f'{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads',
        'torch': torch.__version__, 'rounds': rounds, 'iters_per_round': iters,
        'variants': {name: {str(k): repr(v) for k, v in opts.items()}
                     for name, opts in variants.items()},
        'median_step_s': median,
        'round_median_step_s': round_medians,
        'relative_to_config': {name: statistics.median(
            v / c for v, c in zip(round_medians[name], round_medians['config']))
            for name in variants},
    }
    print(f'\nFT training step of {summary["config"]} ({summary["machine"]}):')
    for name in variants:
        line = (f'  {name:<12} {median[name]:.3f} s/iteration  '
                f'({summary["relative_to_config"][name]:.2f}x the config)')
        if args.study_iterations:
            hours = args.study_iterations * median[name] / 3600
            summary.setdefault('study_core_hours', {})[name] = hours
            line += f'; {args.study_iterations} iterations: {hours:.1f} core-hours'
        print(line)
    if args.study_iterations:
        summary['study_iterations'] = args.study_iterations
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(summary, f, indent=2)
    print(f'wrote {args.out}')
    return summary


if __name__ == '__main__':
    main()
