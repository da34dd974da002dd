"""The embedded demo as a :class:`~daft_mm.benchmark.task.TaskSpec`: generated street scenes
(one ID look, three OOD looks), a backbone pretrained here on a coarse source task, and the
tiny DeepLabV3 of ``configs/demo``. Everything after :func:`demo_task` is the comparison every
task runs."""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from daft_mm.utils import atomic_save, atomic_write_json

from .data import COARSE_CATEGORIES, REPO, DataRoots, Settings, make_data
from .task import TaskSpec, plain

__all__ = ['DEMO_CONFIGS', 'demo_task', 'pretrain_demo_backbone', 'cached_checkpoint_problem']

DEMO_CONFIGS = REPO / 'configs' / 'demo'
FT_CONFIG = DEMO_CONFIGS / 'ft_demo.py'
PRETRAIN_CONFIG = DEMO_CONFIGS / 'pretrain_demo.py'


def cached_checkpoint_problem(ckpt: Path, s: Settings) -> Optional[str]:
    """Why a cached backbone checkpoint cannot be reused (None: it can)."""
    import torch
    try:
        saved = torch.load(ckpt, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle...: all mean "redo"
        return f'cannot be read ({type(exc).__name__}: {exc}; cut short by a kill?)'
    if not isinstance(saved, dict) or not saved.get('state_dict'):
        return 'holds no state_dict'
    if any(not k.startswith('backbone.') for k in saved['state_dict']):
        return 'holds more than a backbone'
    if (saved.get('meta') or {}).get('pretrain_key') != s.pretrain_key():
        return 'was made with other data or pretraining settings'
    return None


def pretrain_demo_backbone(s: Settings, work_dir: Path, roots: DataRoots,
                           step: Callable[[str], None], verbose: bool = False) -> str:
    """Pretrain (or reuse) the backbone on the coarse-labelled source set; keep only the backbone
    (the fine-tuning task has other classes, so its decode head is new for every method)."""
    import torch
    from mmengine.runner import Runner
    out_dir = work_dir / 'pretrain' / s.pretrain_key()
    ckpt = out_dir / 'backbone.pth'
    unusable = cached_checkpoint_problem(ckpt, s) if ckpt.is_file() else None
    if unusable:
        step(f'pretraining: the cached {ckpt} {unusable}; pretraining again')
        ckpt.unlink()
    if ckpt.is_file():
        step(f'pretraining: reusing {ckpt}')
        return str(ckpt)
    t0 = time.time()
    n = len(COARSE_CATEGORIES)
    run_dir = out_dir / 'run'
    cfg = _pretrain_config(s, roots, run_dir, n, verbose)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    Runner.from_cfg(cfg).train()
    # The project's loader: restricted unpickling with the mmengine allow-list on any torch.
    from daft_mm.mm.safe_load import load_checkpoint_file
    last = run_dir / f'iter_{s.pretrain_iters}.pth'
    state = {k: v for k, v in load_checkpoint_file(str(last), map_location='cpu')
             ['state_dict'].items() if k.startswith('backbone.')}
    # atomically: a kill while saving must not leave a truncated cache that later runs reuse
    atomic_save(lambda f: torch.save({'state_dict': state, 'meta': {
        'pretrain_key': s.pretrain_key(), 'settings': asdict(s),
        'source_classes': list(COARSE_CATEGORIES)}}, f), str(ckpt))
    shutil.rmtree(run_dir, ignore_errors=True)
    atomic_write_json(str(out_dir / 'settings.json'), asdict(s), indent=1, default=str)
    step(f'pretraining: {s.pretrain_iters} iterations on the coarse source set in '
         f'{time.time() - t0:.0f}s -> {ckpt}')
    return str(ckpt)


def _pretrain_config(s: Settings, roots: DataRoots, run_dir: Path, n_classes: int,
                     verbose: bool) -> Any:
    from .runs import run_config
    options = {'data_root': roots.source, 'randomness.seed': 0,
               'train_dataloader.batch_size': s.batch_size,
               'optim_wrapper.optimizer.lr': s.pretrain_lr,
               'model.model.decode_head.num_classes': n_classes,
               'model.model.auxiliary_head.num_classes': n_classes}
    return run_config(str(PRETRAIN_CONFIG), options, run_dir, 'demo_pretrain',
                      iters=s.pretrain_iters, verbose=verbose)


def _val_set(root: str, pipeline: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    return dict(type='CityscapesDataset', data_root=root,
                data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
                pipeline=list(pipeline))


def demo_task(s: Settings, work_dir: Path, step: Callable[[str], None],
              seeds: Optional[Sequence[int]] = None, quick: bool = False,
              verbose: bool = False) -> TaskSpec:
    """Generate (or reuse) the demo's data and pretrained backbone; return the demo's task."""
    from daft_mm.mm.cli import load_config
    roots = make_data(work_dir / 'data' / s.data_key(), s, step)
    backbone = pretrain_demo_backbone(s, work_dir, roots, step, verbose)
    test_pipeline = load_config(str(FT_CONFIG)).test_dataloader.dataset.pipeline
    pipeline = [plain(t) for t in test_pipeline]
    return TaskSpec(
        name='demo', config=str(FT_CONFIG), backbone=backbone,
        id_val=_val_set(roots.id_val, pipeline), id_test=_val_set(roots.id, pipeline),
        ood={name: _val_set(root, pipeline) for name, root in roots.ood.items()},
        corruptions=s.corruptions, options={'data_root': roots.id}, budget=s.budget,
        lp_fraction=s.lp_fraction, batch_size=s.batch_size,
        seeds=tuple(seeds) if seeds else s.seeds, spaces='quick' if quick else 'default',
        description='generated street scenes: backbone pretrained on the coarse 7-category '
                    'source task; every method gets a fresh 19-class decode head')
