"""Train a segmentor (mmseg config) or a detector (mmdet config) with daft-mm registered.

Flags mirror the upstream mmseg/mmdet ``tools/train.py``; the task is read from the config. E.g.

    python tools/train.py configs/_tiny_/tiny_deeplabv3_cityscapes.py \
        --work-dir work_dirs/tiny --cfg-options data_root=data/synthetic/cityscapes
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daft_mm.utils import WorkDirLock

from mmengine.config import DictAction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a segmentor or a detector (daft-mm)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint; without a path, from the latest checkpoint in the '
        'work dir')
    parser.add_argument(
        '--amp', action='store_true', default=False,
        help='enable automatic-mixed-precision training')
    parser.add_argument(
        '--auto-scale-lr', action='store_true',
        help='scale the LR by the total batch size (needs `auto_scale_lr` in the config)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value (e.g. train_cfg.max_iters=10). '
        'data_root=PATH is applied to every dataloader. Lists: key="[a,b]" or key=a,b, no spaces')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
        help='job launcher')
    parser.add_argument(
        '--break-lock', action='store_true',
        help='remove the work dir\'s lock file (.daft_mm.lock) before starting: for a lock left '
        'by a run you know is gone (a lock whose heartbeat stopped 5 minutes ago is taken over '
        'without it)')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank (older).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import daft_mm.mm  # noqa: F401  (registers daft-mm modules, applies daft_mm.mm.compat)
    from daft_mm.mm.cli import TRAIN_LOADERS, load_config
    from daft_mm.mm.resume import launch_rank, refuse_finished_work_dir
    from daft_mm.utils import WorkDirLock

    cfg = load_config(args.config, args.cfg_options, work_dir=args.work_dir,
                      used_loaders=TRAIN_LOADERS,
                      launcher=args.launcher)
    if args.resume is None:
        refuse_finished_work_dir(cfg.work_dir)  # every rank: each must stop, not wait for rank 0
    # One live run per work dir (rank 0 holds the lock for all ranks of a distributed run).
    lock = WorkDirLock(osp.abspath(cfg.work_dir), 'training')
    # SIGTERM (a timeout, Slurm preemption, torchrun stopping the other ranks) ends the run
    # through the finally below, like Ctrl-C, so the lock does not outlive it.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        if launch_rank(args.launcher) == 0:
            lock.acquire(force=args.break_lock)
        _train(args, cfg, lock)
    finally:
        lock.release()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _train(args: argparse.Namespace, cfg: Any, lock: 'WorkDirLock') -> None:
    from daft_mm.mm.cli import (ValidationRuns, close_distributed, detect_task,
                                empty_dataset_message, format_metrics)
    from daft_mm.mm.resume import resolve_resume
    from mmengine.dist import is_main_process
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    task = detect_task(cfg)
    from daft_mm.mm.settings import require_daft_hook
    require_daft_hook(cfg)  # a DAFT config whose custom_hooks lost DAFTHook fails here

    if args.amp:
        optim_type = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_type == 'AmpOptimWrapper':
            print('AMP training is already enabled in the config.')
        elif optim_type != 'OptimWrapper':
            raise ValueError(
                f'--amp needs optim_wrapper.type == "OptimWrapper", got {optim_type!r}')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'

    if args.auto_scale_lr:
        scale = cfg.get('auto_scale_lr')
        if not scale or 'base_batch_size' not in scale:
            raise RuntimeError('--auto-scale-lr needs `auto_scale_lr = dict(enable=False, '
                               'base_batch_size=...)` in the config')
        cfg.auto_scale_lr.enable = True

    resume_note = resolve_resume(cfg, args.resume)
    from daft_mm.mm.optim import complete_daft_config
    complete_daft_config(cfg)  # again: resolve_resume may have set load_from / resume

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if lock.taken_over:
        runner.logger.warning(f'work dir lock {lock.path} taken over: '
                              f'{lock.taken_over_because}')
    if resume_note:  # a fresh start under --resume is worth a warning: the user asked to resume
        warn = not cfg.resume or "truncated" in resume_note
        (runner.logger.warning if warn else runner.logger.info)(resume_note)
    validations = ValidationRuns()
    runner.register_hook(validations, priority='VERY_LOW')
    try:
        runner.train()
    except ValueError as exc:
        empty = empty_dataset_message(exc)
        if empty is None:
            raise
        raise ValueError(empty) from exc

    # RuntimeInfoHook keeps the latest validation metrics in the message hub as "val/<name>".
    final = {key[len('val/'):]: buf.current()
             for key, buf in runner.message_hub.log_scalars.items()
             if key.startswith('val/') and key not in ('val/time', 'val/data_time')}
    if is_main_process():
        if final:
            print(f'[daft-mm] {task} final validation metrics: {format_metrics(final)}', flush=True)
        elif not validations.count:
            print(f'[daft-mm] {task} training finished without a validation run', flush=True)
    close_distributed()


if __name__ == '__main__':
    main()
