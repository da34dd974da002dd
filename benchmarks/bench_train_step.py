"""Does DAFT cost anything per training step? FT vs DAFT iteration time on a tiny DeepLabV3.

DAFT's work (BN conversion, zero-init) happens once in ``before_train``; afterwards a step is an
ordinary FT step with two parameter groups. This measures it with the real demo configs
(``configs/demo/{ft,daft}_demo.py``, which inherit the shipped FT / DAFT configs), the real mmengine
Runner and mmengine's own per-iteration timer (``IterTimerHook`` -> ``train/time``), in interleaved
rounds so that machine noise hits both alike; the ratio is the median over rounds of the ratio of the
two runs' median steps within a round, which cancels the slow drift of a shared machine. The one-off
conversion time is reported separately.

    python benchmarks/bench_train_step.py            # 9 rounds x 20 iterations each
    python benchmarks/bench_train_step.py --quick    # what the test suite runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {'FT': REPO / 'configs/demo/ft_demo.py', 'DAFT': REPO / 'configs/demo/daft_demo.py'}


def time_steps(config: str, options: Mapping[str, Any], work_dir: Path, iters: int,
               warmup: int) -> Dict[str, Any]:
    """One training run of ``config`` with ``options`` (no validation, no checkpoints): the
    per-iteration times after ``warmup`` and the cost of everything around them."""
    from mmengine.runner import Runner

    from daft_mm.mm.cli import load_config
    cfg = load_config(config, {
        **options, 'train_cfg.max_iters': warmup + iters,
        'default_hooks.checkpoint.interval': 10**9, 'default_hooks.logger.interval': 10**9,
        'log_level': 'WARNING'}, work_dir=str(work_dir))
    cfg.experiment_name = f'bench_{time.time_ns()}'
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.pop('visualization', None)
    runner = Runner.from_cfg(cfg)
    start = time.perf_counter()
    runner.train()
    total = time.perf_counter() - start
    times = runner.message_hub.get_scalar('train/time').data[0].tolist()
    steps = times[warmup:]
    return {'step_times': steps, 'before_train_s': total - sum(times)}


def run_once(method: str, data_root: Path, work_dir: Path, iters: int, warmup: int
             ) -> Dict[str, Any]:
    """One training run of the demo's FT or DAFT config on ``data_root``."""
    return time_steps(str(CONFIGS[method]), {'data_root': str(data_root)}, work_dir, iters,
                      warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--quick', action='store_true')
    p.add_argument('--rounds', type=int, default=None)
    p.add_argument('--iters', type=int, default=None)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--out', default='benchmarks/results/train_step.json')
    args = p.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 9)
    args.iters = args.iters or (3 if args.quick else 20)

    import daft_mm  # noqa: F401  (registers DAFTHook / DAFTModel)
    from daft_mm.mm.datasets.synthetic import make_cityscapes

    results: Dict[str, List[float]] = {m: [] for m in CONFIGS}
    round_medians: Dict[str, List[float]] = {m: [] for m in CONFIGS}
    setup: Dict[str, List[float]] = {m: [] for m in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = make_cityscapes(Path(tmp) / 'data', num_train=16, num_val=0, seed=0)
        for r in range(args.rounds):
            order = list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]
            for method in order:
                out = run_once(method, data_root, Path(tmp) / f'{method}_{r}', args.iters,
                               args.warmup)
                results[method].extend(out['step_times'])
                round_medians[method].append(statistics.median(out['step_times']))
                setup[method].append(out['before_train_s'])
                print(f'round {r + 1}/{args.rounds} {method:<4}: median step '
                      f'{statistics.median(out["step_times"]) * 1e3:.1f} ms', flush=True)

    median = {m: statistics.median(t) for m, t in results.items()}
    summary = {
        'machine': f'{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads',
        'torch': torch.__version__, 'rounds': args.rounds, 'iters_per_round': args.iters,
        'median_step_s': median,
        'step_stdev_s': {m: statistics.pstdev(t) for m, t in results.items()},
        'round_median_step_s': round_medians,
        'ratio_daft_vs_ft': statistics.median(
            d / f for d, f in zip(round_medians['DAFT'], round_medians['FT'])),
        'median_before_train_s': {m: statistics.median(t) for m, t in setup.items()},
    }
    print(f'\nper-step time, tiny DeepLabV3 (batch 8, 64x128), {len(results["FT"])} steps each:')
    for m in CONFIGS:
        print(f'  {m:<4} median {median[m] * 1e3:7.1f} ms  (stdev '
              f'{summary["step_stdev_s"][m] * 1e3:.1f} ms), one-off before/after training '
              f'{summary["median_before_train_s"][m]:.2f} s')
    print(f'  DAFT / FT (median of per-round ratios): {summary["ratio_daft_vs_ft"]:.3f}x')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(summary, f, indent=2)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
