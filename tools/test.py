"""Test (and evaluate) a segmentor (mmseg config) or a detector (mmdet config), daft-mm registered.

Flags mirror the upstream mmseg/mmdet ``tools/test.py``; the task is read from the config. E.g.

    python tools/test.py configs/_tiny_/tiny_deeplabv3_cityscapes.py work_dirs/tiny/iter_200.pth \
        --cfg-options data_root=data/synthetic/cityscapes

Prints the metrics (mIoU / mAP) on the last line: ``[daft-mm] seg test metrics: ...``.
"""
from __future__ import annotations

import argparse
import copy
import os
import warnings

from mmengine.config import ConfigDict, DictAction
from mmengine.hooks import Hook


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and eval) a segmentor or a detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='segmentation: directory for the predicted label maps; detection: a .pkl file to '
        'dump the predictions to (offline evaluation)')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir', help='directory where painted images will be saved')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value. data_root=PATH is applied to every '
        'dataloader. Lists: key="[a,b]" or key=a,b, no spaces')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
        help='job launcher')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    parser.add_argument(
        '--allow-partial-checkpoint', action='store_true',
        help='evaluate even when weights of the model are missing from the checkpoint or have '
        'other shapes (they keep their initial values); without it that is an error')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank (older).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def enable_visualization(cfg, args: argparse.Namespace, task: str) -> None:
    """Turn on the config's visualization hook for --show / --show-dir (as upstream per task)."""
    hook = cfg.default_hooks.get('visualization') if cfg.get('default_hooks') else None
    if hook is None:
        raise RuntimeError('--show/--show-dir need a visualization hook in default_hooks, e.g. '
                           "visualization=dict(type='SegVisualizationHook') or "
                           "dict(type='DetVisualizationHook')")
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if task == 'seg':
            cfg.visualizer['save_dir'] = args.show_dir
        else:
            hook['test_out_dir'] = args.show_dir


def enable_tta(cfg, task: str) -> None:
    """Wrap the model in the config's TTA model and use the TTA pipeline (flip-only by default
    for detection, as upstream)."""
    if task == 'det' and 'tta_model' not in cfg:
        warnings.warn('no tta_model in the config: using DetTTAModel with NMS 0.5')
        cfg.tta_model = dict(
            type='DetTTAModel',
            tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    if task == 'det' and 'tta_pipeline' not in cfg:
        warnings.warn('no tta_pipeline in the config: using horizontal flip TTA')
        test_data = cfg.test_dataloader.dataset
        while 'dataset' in test_data:
            test_data = test_data['dataset']
        cfg.tta_pipeline = copy.deepcopy(test_data.pipeline)
        cfg.tta_pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[[dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
                        [dict(type='PackDetInputs',
                              meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                         'scale_factor', 'flip', 'flip_direction'))]])
    for key in ('tta_model', 'tta_pipeline'):
        if key not in cfg:
            raise RuntimeError(f'--tta needs `{key}` in the config')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


class CheckpointMustFit(Hook):
    """Refuses, before any weight is loaded, a checkpoint that lacks weights of the model or
    holds them with other shapes: mmengine loads it non-strictly, the missing weights keep their
    random init, and the test reports a meaningless score with only a warning in the log.
    (mmengine's ``strict=True`` loading would also refuse extra keys, e.g. an auxiliary head the
    test config leaves out; those are harmless here.)"""

    priority = 'VERY_HIGH'

    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from daft_mm.mm.cli import checkpoint_mismatch
        from daft_mm.mm.plan import unwrap
        problem = checkpoint_mismatch(unwrap(runner.model), checkpoint.get('state_dict',
                                                                            checkpoint))
        if problem:
            raise ValueError(
                f'checkpoint {self.checkpoint} does not fit the model of this config: {problem}. '
                'The test would score weights left at their random init. Fix: pass the config the '
                'checkpoint was trained with (or --cfg-options that make the model match, e.g. '
                'the number of classes), or --allow-partial-checkpoint if this is intended')


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    import daft_mm.mm  # noqa: F401  (registers daft-mm modules, applies daft_mm.mm.compat)
    from daft_mm.mm.cli import (TEST_LOADERS, close_distributed, detect_task,
                                empty_dataset_message, format_metrics, load_config)
    from mmengine.dist import is_main_process
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if not os.path.isfile(os.path.expanduser(args.checkpoint)) and '://' not in args.checkpoint:
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist; pass a .pth '
                                'written by tools/train.py (e.g. <work_dir>/iter_200.pth)')
    cfg = load_config(args.config, args.cfg_options, work_dir=args.work_dir,
                      used_loaders=TEST_LOADERS,
                      launcher=args.launcher)
    task = detect_task(cfg)
    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        enable_visualization(cfg, args, task)
    if args.tta:
        enable_tta(cfg, task)
    if args.out is not None and task == 'seg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    if args.out is not None and task == 'det' and not args.out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out for detection must be a .pkl/.pickle file, got {args.out!r}')

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if not args.allow_partial_checkpoint:
        runner.register_hook(CheckpointMustFit(args.checkpoint), priority='VERY_HIGH')
    if args.out is not None and task == 'det':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))

    try:
        metrics = runner.test()
    except ValueError as exc:
        empty = empty_dataset_message(exc, 'test_dataloader.dataset')
        if empty is None:
            raise
        raise ValueError(empty) from exc
    if is_main_process():
        print(f'[daft-mm] {task} test metrics: {format_metrics(metrics)}', flush=True)
    close_distributed()
    return metrics


if __name__ == '__main__':
    main()
