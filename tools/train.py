"""Train a segmentor (mmseg config) or a detector (mmdet config) with daft-mm registered.

Flags mirror the upstream mmseg/mmdet ``tools/train.py``; the task is read from the config. E.g.

    python tools/train.py configs/_tiny_/tiny_deeplabv3_cityscapes.py \
        --work-dir work_dirs/tiny --cfg-options data_root=data/synthetic/cityscapes
"""
from __future__ import annotations

import argparse
import os

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
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank (older).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import daft_mm.mm  # noqa: F401  (registers daft-mm modules, applies daft_mm.mm.compat)
    from daft_mm.mm.cli import detect_task, format_metrics, load_config
    from mmengine.dist import is_main_process
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    cfg = load_config(args.config, args.cfg_options, work_dir=args.work_dir,
                      launcher=args.launcher)
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

    # An explicit checkpoint wins over auto-resume from the work dir.
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()

    # RuntimeInfoHook keeps the latest validation metrics in the message hub as "val/<name>".
    final = {key[len('val/'):]: buf.current()
             for key, buf in runner.message_hub.log_scalars.items()
             if key.startswith('val/') and key not in ('val/time', 'val/data_time')}
    if is_main_process():
        if final:
            print(f'[daft-mm] {task} final validation metrics: {format_metrics(final)}', flush=True)
        else:
            print(f'[daft-mm] {task} training finished without a validation run', flush=True)


if __name__ == '__main__':
    main()
