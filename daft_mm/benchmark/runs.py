"""Training and evaluating one comparison run with mmengine's Runner, in this process.

Runs are cached: a run's ``result.json`` is written (atomically) only after training and
evaluation, keyed by everything the run depends on (the task, method, setting, seed, budget, the
sources of the packages it executes, the bytes of its start checkpoint), so a rerun, or the
default run after a search, reuses finished runs instead of repeating them.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from daft_mm.utils import atomic_write_json

from .data import file_hash, stable_hash
from .methods import MethodSpec, Point, get_method, stage_budgets
from .task import InputError, TaskSpec, limit_images
from .variants import method_config

__all__ = ['Context', 'RunPool', 'load_pretrained', 'run_config', 'run_point', 'miou',
           'code_hash']


@dataclass
class Context:
    """What every run of one comparison shares."""
    task: TaskSpec
    work_dir: Path
    step: Callable[[str], None]  # a finished step, shown as progress
    verbose: bool = False
    #: mmengine ProgressBars over each run's iterations and DAFT's statistics pass: with
    #: --verbose only (bars of runs side by side interleave; a run prints one line when done)
    progress_bars: bool = False
    eval_sets: Dict[str, List[Any]] = field(default_factory=dict)  # name -> cached batches
    id_val_batches: List[Any] = field(default_factory=list)
    dataset_meta: Dict[str, Any] = field(default_factory=dict)  # the ID test set's classes
    pretrained_backbone: Any = None
    task_key: str = ''
    runs: int = 0
    trained: int = 0  # runs trained (not reused) in this process


def _training_bar_hook(total: int):
    """An mmengine ProgressBar over the training iterations (logs stay at ERROR level)."""
    from mmengine.hooks import Hook
    from mmengine.utils import ProgressBar

    class TrainingBar(Hook):
        priority = 'VERY_LOW'

        def before_train(self, runner) -> None:
            self.bar = ProgressBar(total)

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self.bar.update()

        def after_train(self, runner) -> None:
            self.bar.file.write('\n')
            self.bar.file.flush()

    return TrainingBar()


def run_config(path: str, options: Mapping[str, Any], work_dir: Path, name: str, *,
               iters: int, verbose: bool = False):
    """A config as ``tools/train.py`` would load it, set up for one short run inside a
    benchmark process: ``iters`` iterations, one checkpoint at the end, no validation loop."""
    from daft_mm.mm.cli import load_config
    opts = {'train_cfg.max_iters': iters, 'default_hooks.logger.interval': max(1, min(25, iters))}
    opts.update(options)
    cfg = load_config(path, opts, work_dir=str(work_dir))
    # Several Runners share this process; mmengine keys loggers / visualizers by these names.
    cfg.experiment_name = name
    if cfg.get('visualizer'):
        cfg.visualizer['name'] = name
    cfg.log_level = 'INFO' if verbose else 'ERROR'
    # The Runner dumps the config several times per run; yapf-formatting it costs seconds.
    object.__setattr__(cfg, '_format_python_code', False)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # evaluated after training
    cfg.default_hooks.pop('visualization', None)
    # one checkpoint, at the end (a task's own schedule may save every few thousand steps)
    cfg.default_hooks['checkpoint'] = dict(type='CheckpointHook', by_epoch=False,
                                           interval=10**9, save_last=True, max_keep_ckpts=1)
    # The budget is the whole training, counted in iterations for every method; a schedule
    # written for a longer run (PolyLR to 20k) ends with it instead of stopping part way.
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=10**9)
    schedulers = cfg.get('param_scheduler') or []
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
        if scheduler.get('by_epoch', True) is False and scheduler.get('end', 0) > iters:
            scheduler['end'] = iters
    return cfg


def load_run_config(ctx: Context, work_dir: Path, iters: int, options: Mapping[str, Any]):
    """The task's config for one run of ``iters`` iterations, with the task's options."""
    opts = dict(ctx.task.options)
    if ctx.task.batch_size is not None:
        opts['train_dataloader.batch_size'] = ctx.task.batch_size
    opts.update(options)
    ctx.runs += 1
    cfg = run_config(ctx.task.config, opts, work_dir, f'{ctx.task.name}_{os.getpid()}_{ctx.runs}',
                     iters=iters, verbose=ctx.verbose)
    if ctx.task.max_images is not None:  # --quick: a few images (DAFT's statistics pass too)
        cfg.train_dataloader.dataset = limit_images(cfg.train_dataloader.dataset,
                                                    ctx.task.max_images)
    return cfg


def train(ctx: Context, spec: MethodSpec, point: Point, work_dir: Path, *, iters: int,
          seed: int, stage: Optional[str] = None, load_from: Optional[str] = None
          ) -> Tuple[Any, str]:
    """Train ``spec`` at ``point`` in this process; returns (the trained model, its last
    checkpoint)."""
    from mmengine.runner import Runner
    cfg = load_run_config(ctx, work_dir, iters, {'randomness.seed': seed})
    method_config(cfg, spec, point, backbone=ctx.task.backbone,
                  backbone_prefix=ctx.task.backbone_prefix, stage=stage)
    if load_from is not None:
        cfg.load_from = load_from
    for hook in cfg.custom_hooks:
        if hook.get('type') == 'DAFTHook':
            hook['progress_bar'] = ctx.progress_bars
    if work_dir.exists():
        shutil.rmtree(work_dir)
    runner = Runner.from_cfg(cfg)
    if ctx.progress_bars:
        runner.register_hook(_training_bar_hook(iters))
    runner.train()
    ckpt = work_dir / f'iter_{iters}.pth'
    if not ckpt.is_file():
        raise RuntimeError(f'training {spec.name} wrote no checkpoint at {ckpt}')
    return runner.model, str(ckpt)


# ------------------------------------------------------------------------------------ evaluation
def _batches(ctx: Context, dataset: Dict[str, Any], what: str
             ) -> Tuple[List[Any], Dict[str, Any]]:
    from mmengine.runner import Runner
    try:
        dl = Runner.build_dataloader(dict(
            batch_size=ctx.task.eval_batch_size, num_workers=0,
            sampler=dict(type='DefaultSampler', shuffle=False),
            dataset=limit_images(dataset, ctx.task.max_images)))
        batches = list(dl)
    except OSError as err:  # a file the folder check could not see (an image in a list)
        raise InputError(f'{what}: {err}. Fix: check that set\'s data_root / ann_file / '
                         'data_prefix (--cfg-options data_root=DIR for every set)') from err
    if not batches:
        raise InputError(f'{what} holds no images ({dataset.get("data_root")!r}, '
                         f'{dataset.get("ann_file")!r}): every method would score on nothing')
    return batches, dict(dl.dataset.metainfo)


def build_eval_sets(ctx: Context) -> None:
    """Load every evaluation set once through its own pipeline and keep the batches: pipelines
    are deterministic (corruptions are seeded per image), and every model sees the same."""
    task = ctx.task
    ctx.eval_sets['ID'], ctx.dataset_meta = _batches(ctx, task.id_test, 'the ID test set')
    for name, dataset in task.ood.items():
        ctx.eval_sets[name], _ = _batches(ctx, dataset, f'OOD set {name!r}')
    for corruption, severity in task.corruptions:
        dataset = copy.deepcopy(task.id_test)
        pipeline = dataset['pipeline']
        at = next((i + 1 for i, t in enumerate(pipeline) if t['type'] == 'LoadImageFromFile'), 0)
        pipeline.insert(at, dict(type='ImageCorruption', corruption=corruption,
                                 severity=severity))
        ctx.eval_sets[f'{corruption}-{severity}'], _ = _batches(
            ctx, dataset, f'OOD set {corruption}-{severity}')
    ctx.id_val_batches, _ = _batches(ctx, task.id_val, 'ID-val')


def miou(model: Any, batches: List[Any], dataset_meta: Mapping[str, Any]) -> float:
    """mIoU (%) of ``model`` on cached batches, with mmseg's IoUMetric."""
    import torch
    from mmengine.evaluator import Evaluator
    from mmseg.evaluation import IoUMetric
    evaluator = Evaluator([IoUMetric(iou_metrics=['mIoU'])])
    evaluator.dataset_meta = dict(dataset_meta)
    model.eval()
    n = 0
    with torch.no_grad():
        for batch in batches:
            evaluator.process(data_samples=model.test_step(batch), data_batch=batch)
            n += len(batch['inputs'])
    return float(evaluator.evaluate(n)['mIoU'])


def evaluate(model: Any, ctx: Context) -> Dict[str, Any]:
    """ID-val (for choices), ID-test and OOD mIoU, and the deepest backbone features' cosine
    similarity to the pretrained backbone on the ID test images."""
    from daft_mm.mm.hooks.distortion_hook import compare_backbones
    meta = ctx.dataset_meta
    scores = {name: miou(model, batches, meta) for name, batches in ctx.eval_sets.items()}
    ood = {k: v for k, v in scores.items() if k != 'ID'}
    inner = getattr(model, 'model', model)  # DAFTModel -> segmentor
    stats, _ = compare_backbones(inner, {'pretrained': ctx.pretrained_backbone,
                                         'finetuned': inner.backbone},
                                 [('pretrained', 'finetuned')], ctx.eval_sets['ID'], levels=(-1, ))
    means = next(iter(stats[('pretrained', 'finetuned')].values())).means()
    return dict(id_val=miou(model, ctx.id_val_batches, meta), id=scores['ID'], ood=ood,
                ood_mean=sum(ood.values()) / len(ood), cosine=means['pixel_cosine'],
                cosine_pooled=means['cosine'])


def load_pretrained(ctx: Context) -> None:
    """The pretrained backbone (the reference of feature distortion), built the way every run
    builds it, and the evaluation sets."""
    from mmengine.registry import MODELS
    if not Path(ctx.task.backbone).is_file():
        raise FileNotFoundError(f'the pretrained backbone {ctx.task.backbone} does not exist')
    cfg = load_run_config(ctx, ctx.work_dir / 'unused', 1, {})
    method_config(cfg, get_method('FT'), Point(lr=0.0), backbone=ctx.task.backbone,
                  backbone_prefix=ctx.task.backbone_prefix)
    backbone = MODELS.build(cfg.model).model.backbone
    _load_backbone(ctx.task, backbone)
    build_eval_sets(ctx)
    ctx.pretrained_backbone = copy.deepcopy(backbone)
    ctx.pretrained_backbone.eval()  # not chained: mmseg's ResNet.train() returns None
    ctx.task_key = ctx.task_key or ctx.task.key()


def _load_backbone(task: TaskSpec, backbone: Any) -> None:
    """Load the checkpoint's backbone (the keys under the prefix, as every run's Pretrained
    init_cfg does), refusing one that does not hold the whole backbone: mmengine's Pretrained
    init only warns about missing keys, and a half-random backbone would compare the methods on
    a premise nobody chose. The refusal says which prefix would load it."""
    from daft_mm.mm.cli import checkpoint_mismatch
    from daft_mm.mm.compat import load_checkpoint_file
    from daft_mm.mm.loaded import own_shapes
    saved = load_checkpoint_file(task.backbone, map_location='cpu')
    state = saved.get('state_dict', saved) if isinstance(saved, dict) else saved
    if not isinstance(state, Mapping) or not state:
        raise InputError(f'the pretrained backbone {task.backbone} holds no state dict')
    prefix = task.backbone_prefix or ''
    if prefix and not prefix.endswith('.'):  # mmengine's Pretrained init adds the dot too
        prefix += '.'
    own = own_shapes(backbone)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    problem = checkpoint_mismatch(backbone, sub) if sub else f'no key starts with {prefix!r}'
    if problem:
        raise InputError(f'the pretrained backbone {task.backbone} does not fit the config\'s '
                         f'backbone with ' + (f'the key prefix {prefix!r}' if prefix else
                                              'no key prefix') + f': {problem}. '
                         + _prefix_advice(state, own, prefix))
    backbone.load_state_dict(sub, strict=False)


def _prefix_advice(state: Mapping[str, Any], own: Mapping[str, Tuple[int, ...]],
                   given: str) -> str:
    """Which key prefixes a checkpoint holds and the ``--backbone-prefix`` that loads the
    backbone from it (the prefix under which most backbone weights fit, shapes included)."""
    import shlex
    from collections import Counter

    from daft_mm.mm.loaded import fitting_prefix
    groups = Counter(k.split('.')[0] + '.' if '.' in k else k for k in state)
    held = ', '.join(f'{g!r} ({n})' for g, n in groups.most_common(4))
    text = f'The file holds {len(state)} tensors, by leading key: {held}'
    best, n = fitting_prefix(state, own)
    if not n:
        return text + '; none of them is a weight of this backbone. Pass a checkpoint of this ' \
                      'architecture'
    if best == given:  # the prefix is right, the architecture is not (another depth or width)
        return (text + f'. Only {n} of the backbone\'s {len(own)} weights are in it under that '
                'prefix: a checkpoint of another architecture (depth, width). Pass one of the '
                'config\'s backbone')
    return (text + f'. {n} of the backbone\'s {len(own)} weights fit '
            + (f'under the prefix {best!r}' if best else 'with no prefix (the file is the '
               'backbone\'s own state dict)')
            + f': pass --backbone-prefix {shlex.quote(best)} (in a config: compare = '
              f'dict(backbone_prefix={best!r}))')


# ------------------------------------------------------------------------------------ runs
def _cached(path: Path, key: str) -> Optional[Dict[str, Any]]:
    try:
        cached = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
    return cached['result'] if cached and cached.get('key') == key else None


#: The packages a run executes: a cached run is reused only if their sources are unchanged
#: (a change of the conversion rule must not hand back runs made under the old one).
_CODE = ('core', 'mm', 'benchmark', 'utils')


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    """One hash over the sources of :data:`_CODE`, taken once per process."""
    package = Path(__file__).resolve().parents[1]
    files = sorted(p for sub in _CODE for p in (package / sub).rglob('*.py'))
    return stable_hash([(str(p.relative_to(package)), file_hash(p)) for p in files])


def _run_key(ctx: Context, **parts: Any) -> str:
    return stable_hash(dict(parts, task=ctx.task_key, code=code_hash(),
                            start=file_hash(Path(ctx.task.backbone))))


def lp_stage(ctx: Context, seed: int, iters: int, probe: Point) -> str:
    """LP-FT's probe stage (the LP method at ``probe``, LP's chosen setting, for ``iters``): its
    checkpoint."""
    key = _run_key(ctx, stage='lp', point=probe.to_dict(), seed=seed, iters=iters)
    work = ctx.work_dir / 'runs' / 'LP-FT_stage1' / key
    ckpt = work / f'iter_{iters}.pth'
    if _cached(work / 'done.json', key) is not None and ckpt.is_file():
        return str(ckpt)
    _, last = train(ctx, get_method('LP'), probe, work, iters=iters, seed=seed, stage='lp')
    atomic_write_json(str(work / 'done.json'), dict(key=key, result={'checkpoint': last}))
    return last


def run_point(ctx: Context, spec: MethodSpec, point: Point, seed: int,
              probe: Optional[Point] = None, budget: Optional[int] = None) -> Dict[str, Any]:
    """Train ``spec`` at ``point`` with ``seed`` for the budget (``budget``: another one, for
    the check that the budget suffices) and evaluate it, or reuse a finished run with the same
    key. LP-FT's probe stage trains at ``probe`` (LP's chosen setting). The result says whether
    it was reused."""
    budget = budget or ctx.task.budget
    budgets = stage_budgets(spec, budget, ctx.task.lp_fraction)
    lp_setting = None
    if spec.lp_first:
        if probe is None:
            raise ValueError(f'{spec.name} needs the setting of its probe stage (LP\'s choice)')
        lp_setting = probe.to_dict()
    key = _run_key(ctx, method=spec.name, recipe=spec.recipe, point=point.to_dict(), seed=seed,
                   budgets=budgets, lp=lp_setting)
    work = ctx.work_dir / 'runs' / spec.name.replace(' ', '_').replace('/', '') / key
    cached = _cached(work / 'result.json', key)
    if cached is not None:
        return dict(cached, reused=True)
    t0 = time.time()
    load_from = lp_stage(ctx, seed, budgets['lp'], probe) if spec.lp_first else None
    iters = budgets['ft' if spec.lp_first else spec.recipe]
    model, last = train(ctx, spec, point, work, iters=iters, seed=seed, load_from=load_from)
    result = evaluate(model, ctx)
    result.update(method=spec.name, setting=point.to_dict(), seed=seed, budgets=budgets,
                  lp_setting=lp_setting, seconds=time.time() - t0)
    Path(last).unlink()  # nothing starts from it; keeps a search's disk use small
    atomic_write_json(str(work / 'result.json'), dict(key=key, result=result), indent=1,
                      default=str)
    ctx.trained += 1
    return dict(result, reused=False)


# ------------------------------------------------------------------------------------ workers
Task = Tuple[str, Point, int]  # (method name, setting, seed)
_WORKER: Dict[str, Any] = {}


def _init_worker(task: TaskSpec, task_key: str, work_dir: Path, verbose: bool) -> None:
    """A worker process: one torch thread, the registries, and its own copy of the shared
    context (evaluation sets, the pretrained backbone), built once."""
    import warnings

    import torch
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore')
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    init_default_scope('mmseg')
    ctx = Context(task=task, work_dir=work_dir, step=lambda _: None, verbose=verbose,
                  progress_bars=False, task_key=task_key)
    load_pretrained(ctx)
    _WORKER['ctx'] = ctx


def _work(name: str, point: Point, seed: int, probe: Optional[Point],
          budget: Optional[int]) -> Dict[str, Any]:
    return run_point(_WORKER['ctx'], get_method(name), point, seed, probe, budget)


def _probe_stage(seed: int, probe: Point, budget: Optional[int]) -> str:
    ctx = _WORKER['ctx']
    return lp_stage(ctx, seed, stage_budgets(get_method('LP-FT'), budget or ctx.task.budget,
                                             ctx.task.lp_fraction)['lp'], probe)


class RunPool:
    """Runs independent fine-tuning runs side by side in ``workers`` processes of one torch
    thread each (on 2 cores that beats one process with two threads: a tiny model's ops do not
    scale across threads, and two busy OpenMP teams on two cores stall each other). With one
    worker, runs go in this process, one after another."""

    def __init__(self, ctx: Context, workers: int = 1) -> None:
        self.ctx = ctx
        self.workers = workers
        self._pool = None
        # A search runs its chains of methods in threads that share this pool: one executor for
        # all of them (not one each), and in-process runs one at a time (a Runner is not
        # thread-safe: mmengine keeps the current scope, logger and message hub per process).
        self._lock = threading.RLock()

    def __enter__(self) -> 'RunPool':
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _executor(self):
        with self._lock:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor
                c = self.ctx
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context('spawn'),
                    initializer=_init_worker,
                    initargs=(c.task, c.task_key, c.work_dir, c.verbose))
            return self._pool

    def run(self, tasks: List[Task],
            done: Optional[Callable[[Task, Dict[str, Any]], None]] = None,
            probe: Optional[Point] = None, budget: Optional[int] = None
            ) -> List[Dict[str, Any]]:
        """Results of ``tasks`` in order (each distinct task runs once); ``done`` is called as
        each finishes. ``probe``: LP's chosen setting, the probe stage of LP-FT tasks; those
        stages run first, once per seed, so no two workers train the same one. ``budget``:
        another budget than the task's (the check that FT has levelled off)."""
        unique = list(dict.fromkeys(tasks))
        results: Dict[Task, Dict[str, Any]] = {}
        if self.workers <= 1:
            for task in unique:
                with self._lock:
                    results[task] = run_point(self.ctx, get_method(task[0]), task[1], task[2],
                                              probe, budget)
                if done is not None:
                    done(task, results[task])
            return [results[t] for t in tasks]
        from concurrent.futures import as_completed
        pool = self._executor()
        lp_seeds = sorted({seed for name, _, seed in unique if get_method(name).lp_first})
        for future in [pool.submit(_probe_stage, seed, probe, budget) for seed in lp_seeds]:
            future.result()
        futures = {pool.submit(_work, *task, probe, budget): task for task in unique}
        for future in as_completed(futures):
            task = futures[future]
            results[task] = future.result()
            self.ctx.trained += not results[task]['reused']
            if done is not None:
                done(task, results[task])
        return [results[t] for t in tasks]
