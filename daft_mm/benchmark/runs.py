"""What one trial of a comparison is: training a method at a setting with mmengine's Runner, in
this process, to a rung of its budget or to the end, and evaluating it. Where trials run is the
engine's business (:mod:`daft_mm.benchmark.engine`, Ray Tune); this module never schedules.

A trial always trains under the schedule of the *whole* budget and can stop at a rung: its
checkpoint there (with the optimizer, the LR schedule and the random streams) lets a promoted
trial continue to the next rung and end exactly where an uninterrupted run would.

Trials are cached: a result (``result.json`` at the end, ``rung_<iters>.json`` at a rung) is
written atomically only after training and evaluation, keyed by everything the run depends on (the
task, method, setting, seed, budget, the sources of the packages it executes, the bytes of its
start checkpoint), so a rerun reuses finished trials and continues promoted ones from their rung
checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from daft_mm.utils import atomic_write_json

from .data import file_hash, stable_hash
from .methods import MethodSpec, Point, get_method, stage_budgets
from .scoring import SCOPES, score
from .task import InputError, TaskSpec, limit_images
from .variants import method_config

__all__ = ['Context', 'Job', 'load_pretrained', 'run_config', 'run_trial', 'cached_result',
           'worker_context', 'save_eval_sets', 'set_score', 'id_val_score', 'code_hash',
           'lpft_endpoints', 'FINAL_WEIGHTS']


_RUN_NUMBER = itertools.count(1)


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
    evaluator: Any = None  # detection: the config's test_evaluator (mmdet's own metric)
    pretrained_backbone: Any = None
    task_key: str = ''
    runs: int = 0
    trained: int = 0  # runs trained (not reused) in this process
    full_sets: bool = False  # ID test and OOD sets built (ID-val alone suffices at a rung)


@dataclass(frozen=True)
class Job:
    """One trial: ``method`` at ``point`` with ``seed``, trained to ``iters`` iterations of its
    (last) stage (None: to the end) under the whole budget's schedule, continuing from its rung
    checkpoint at ``start`` (0: from the start). ``probe``: LP's setting, LP-FT's probe stage;
    ``budget``: another budget than the task's (the check that FT has levelled off);
    ``kind='probe'``: LP-FT's probe stage alone (one per seed, before the LP-FT trials);
    ``rerun``: train even though a result is cached (WiSE-FT needs an LP-FT run's two ends,
    checkpoints that a study carried to another machine has not got)."""

    method: str
    point: Point
    seed: int
    iters: Optional[int] = None
    start: int = 0
    probe: Optional[Point] = None
    budget: Optional[int] = None
    kind: str = 'run'
    rerun: bool = False

    def label(self) -> str:
        text = f'{self.method} {self.point.label()} seed {self.seed}'
        if self.kind == 'probe':
            return f'LP-FT probe stage ({self.point.label()}) seed {self.seed}'
        if self.iters is not None:
            text += f' to {self.iters} it.' + (f' (from {self.start})' if self.start else '')
        if self.budget is not None:
            text += f' at a budget of {self.budget}'
        return text


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
               iters: int, verbose: bool = False, schedule: Optional[int] = None):
    """A config as ``tools/train.py`` would load it, set up for one short run inside a
    benchmark process: ``iters`` iterations under the LR schedule of ``schedule`` iterations
    (default ``iters``; more: a run stopped at a rung), one checkpoint at the end, no validation
    loop."""
    schedule = schedule or iters
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
    # written for a longer run (PolyLR to 20k) ends with it instead of stopping part way. The end
    # is written out: mmengine's default end is max_iters, which at a rung is not the budget.
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=10**9)
    schedulers = cfg.get('param_scheduler') or []
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
        if scheduler.get('by_epoch', True) is False:
            scheduler['end'] = min(scheduler.get('end', schedule), schedule)
    return cfg


def load_run_config(ctx: Context, work_dir: Path, iters: int, options: Mapping[str, Any],
                    schedule: Optional[int] = None):
    """The task's config for one run of ``iters`` iterations (of a ``schedule``), with the
    task's options."""
    opts = dict(ctx.task.options)
    if ctx.task.batch_size is not None:
        opts['train_dataloader.batch_size'] = ctx.task.batch_size
    opts.update(options)
    ctx.runs += 1
    # unique in this process (mmengine keys its loggers and visualizers by it), across contexts
    cfg = run_config(ctx.task.config, opts, work_dir,
                     f'{ctx.task.name}_{os.getpid()}_{next(_RUN_NUMBER)}',
                     iters=iters, verbose=ctx.verbose, schedule=schedule)
    if ctx.task.max_images is not None:  # --quick: a few images (DAFT's statistics pass too)
        cfg.train_dataloader.dataset = limit_images(cfg.train_dataloader.dataset,
                                                    ctx.task.max_images)
    return cfg


def _run_hooks():
    """Two hooks every trial has: random streams kept across a rung, and a divergence stop."""
    import numpy as np
    import torch
    from mmengine.hooks import Hook

    class RandomStreams(Hook):
        """Keeps the Python, NumPy and torch random states in the checkpoint and puts them back
        once a resumed run has skipped the data it already trained on (mmengine replays the
        loader, which draws from them), so a trial continued from a rung ends with the same
        numbers as one run straight through. mmengine resumes everything else (weights,
        optimizer, LR schedule, iteration, sampler position) but not these."""
        priority = 'VERY_LOW'

        def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
            checkpoint['random_streams'] = dict(
                python=random.getstate(), numpy=np.random.get_state(),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

        def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
            self._state = checkpoint.get('random_streams')

        def before_train_epoch(self, runner) -> None:
            state, loop = getattr(self, '_state', None), runner.train_loop
            if state is None or loop.iter == 0:
                return
            inner, skip = loop.dataloader_iterator, loop.iter

            class Restored:  # the loop's skip draws `skip` batches, then the streams go back
                def __iter__(self):
                    return self

                def __next__(self):
                    nonlocal skip
                    batch = next(inner)
                    skip -= 1
                    if skip == 0:
                        random.setstate(state['python'])
                        np.random.set_state(state['numpy'])
                        torch.set_rng_state(state['torch'])
                        if state.get('cuda') is not None and torch.cuda.is_available():
                            torch.cuda.set_rng_state_all(state['cuda'])
                        loop.dataloader_iterator = inner
                    return batch
            loop.dataloader_iterator = Restored()

    class StopOnDivergence(Hook):
        """A loss that is no longer finite ends the trial with an error that says where (the
        search then ranks the setting last), instead of training on NaN weights."""
        priority = 'VERY_HIGH'

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            loss = (outputs or {}).get('loss')
            if loss is None:
                return
            loss = float(loss.detach() if hasattr(loss, 'detach') else loss)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f'the training loss became {loss} at iteration {runner.iter + 1}: '
                    'this setting diverges (a lower learning rate would not)')

    return [RandomStreams(), StopOnDivergence()]


def train(ctx: Context, spec: MethodSpec, point: Point, work_dir: Path, *, iters: int,
          seed: int, stage: Optional[str] = None, load_from: Optional[str] = None,
          schedule: Optional[int] = None, resume: bool = False) -> Tuple[Any, str]:
    """Train ``spec`` at ``point`` in this process to ``iters`` iterations of a ``schedule``
    (default ``iters``); ``resume``: continue ``load_from`` (a rung checkpoint of this run).
    Returns (the trained model, its last checkpoint)."""
    from mmengine.runner import Runner
    cfg = load_run_config(ctx, work_dir, iters, {'randomness.seed': seed}, schedule)
    method_config(cfg, spec, point, backbone=ctx.task.backbone,
                  backbone_prefix=ctx.task.backbone_prefix, stage=stage)
    if load_from is not None:
        cfg.load_from = load_from
        cfg.resume = resume
    for hook in cfg.custom_hooks:
        if hook.get('type') == 'DAFTHook':
            hook['progress_bar'] = ctx.progress_bars
    if work_dir.exists():
        shutil.rmtree(work_dir)
    from daft_mm.mm.optim import complete_daft_config
    complete_daft_config(cfg)  # after the method's keys and load_from are set
    runner = Runner.from_cfg(cfg)
    for hook in _run_hooks():
        runner.register_hook(hook)
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
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it indexes
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
    ctx.full_sets = True


def _eval_sets_file(ctx: Context) -> Path:
    return ctx.work_dir / 'eval_sets' / f'{stable_hash([ctx.task_key, code_hash()])}.pt'


def save_eval_sets(ctx: Context) -> None:
    """The evaluation batches, once, for the trials' workers to load instead of building them
    again (corruptions are slow to compute); on a cluster the work dir is shared."""
    import torch
    path = _eval_sets_file(ctx)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f'.{os.getpid()}.tmp')
    torch.save(dict(eval_sets=ctx.eval_sets, id_val=ctx.id_val_batches,
                    meta=ctx.dataset_meta), tmp)
    os.replace(tmp, path)


def _load_eval_sets(ctx: Context) -> bool:
    import torch
    path = _eval_sets_file(ctx)
    if not path.is_file():
        return False
    # our own file, written by save_eval_sets from this task's datasets: data samples, not weights
    saved = torch.load(path, map_location='cpu', weights_only=False)
    ctx.eval_sets, ctx.id_val_batches = saved['eval_sets'], saved['id_val']
    ctx.dataset_meta, ctx.full_sets = saved['meta'], True
    return True


def _set_dataset(ctx: Context, name: str) -> Mapping[str, Any]:
    """The dataset config of an evaluation set (``'id_val'``, ``'ID'``, an OOD set's name; a
    corruption is of the ID test images): a detection metric reads its annotation file."""
    task = ctx.task
    return (task.id_val if name == 'id_val' else task.ood[name] if name in task.ood
            else task.id_test)


def set_score(model: Any, ctx: Context, name: str, evaluator: Any = None
              ) -> Tuple[float, Optional[Dict[str, Any]], Dict[str, float]]:
    """``model``'s score on one evaluation set with the task's metric
    (:func:`daft_mm.benchmark.scoring.score`); ``evaluator``: a detection metric config other
    than the task's (the box floor scores boxes only)."""
    batches = ctx.id_val_batches if name == 'id_val' else ctx.eval_sets[name]
    return score(model, batches, ctx.dataset_meta, kind=ctx.task.kind,
                 evaluator_cfg=ctx.evaluator if evaluator is None else evaluator,
                 dataset=_set_dataset(ctx, name))


def id_val_score(model: Any, ctx: Context) -> float:
    """The score every choice is made on."""
    return set_score(model, ctx, 'id_val')[0]


def evaluate(model: Any, ctx: Context) -> Dict[str, Any]:
    """ID-val (for choices), ID-test and OOD scores (mIoU, or a detector's mAP), and the deepest
    backbone features' cosine similarity to the pretrained backbone on the ID test images.
    Segmentation keeps each image's per-class counts (``counts``); detection its other mAPs
    (``extra``: mask mAP)."""
    from daft_mm.mm.distortion import compare_backbones
    from daft_mm.mm.plan import split_model
    if not ctx.full_sets:
        build_eval_sets(ctx)
    scores, counts, extra = {}, {}, {}
    for name in ctx.eval_sets:
        scores[name], counts[name], extra[name] = set_score(model, ctx, name)
    ood = {k: v for k, v in scores.items() if k != 'ID'}
    inner = split_model(model)[1]  # DAFTModel -> segmentor
    stats, _ = compare_backbones(inner, {'pretrained': ctx.pretrained_backbone,
                                         'finetuned': inner.backbone},
                                 [('pretrained', 'finetuned')], ctx.eval_sets['ID'], levels=(-1, ))
    means = next(iter(stats[('pretrained', 'finetuned')].values())).means()
    result = dict(id_val=id_val_score(model, ctx), id=scores['ID'], ood=ood,
                  ood_mean=sum(ood.values()) / len(ood), cosine=means['pixel_cosine'],
                  cosine_pooled=means['cosine'])
    if ctx.task.kind == 'seg':
        result['counts'] = counts
    if any(extra.values()):
        result['extra'] = extra
    return result


def load_pretrained(ctx: Context, eval_sets: bool = True) -> None:
    """The pretrained backbone (the reference of feature distortion), built the way every run
    builds it, and the evaluation sets (``eval_sets=False``: those a worker saved, or later)."""
    from mmengine.registry import MODELS
    if not Path(ctx.task.backbone).is_file():
        raise FileNotFoundError(f'the pretrained backbone {ctx.task.backbone} does not exist')
    cfg = load_run_config(ctx, ctx.work_dir / 'unused', 1, {})
    method_config(cfg, get_method('FT'), Point(lr=0.0), backbone=ctx.task.backbone,
                  backbone_prefix=ctx.task.backbone_prefix)
    backbone = MODELS.build(cfg.model).model.backbone
    _refuse_without_bn(ctx.task, backbone)
    _load_backbone(ctx.task, backbone)
    ctx.evaluator = cfg.get('test_evaluator')
    ctx.task_key = ctx.task_key or ctx.task.key()
    if eval_sets:
        build_eval_sets(ctx)
    elif not _load_eval_sets(ctx):
        ctx.id_val_batches, ctx.dataset_meta = _batches(ctx, ctx.task.id_val, 'ID-val')
    ctx.pretrained_backbone = copy.deepcopy(backbone)
    ctx.pretrained_backbone.eval()  # not chained: mmseg's ResNet.train() returns None
    ctx.task_key = ctx.task_key or ctx.task.key()


def _refuse_without_bn(task: TaskSpec, backbone: Any) -> None:
    """A backbone without BatchNorm has no statistics to convert: DAFT's first half would do
    nothing, and the comparison would measure integrated LP+FT under DAFT's name."""
    from daft_mm.core.modules import is_batchnorm
    if not any(is_batchnorm(m) for m in backbone.modules()):
        norm = [type(m).__name__ for m in backbone.modules()
                if 'norm' in type(m).__name__.lower()][:1]
        raise InputError(
            f'{task.config}: the backbone ({type(backbone).__name__}) has no BatchNorm layer'
            + (f' (its norm layers are {norm[0]})' if norm else '') + ': DAFT converts BN '
            'statistics, so there is nothing to convert and its rows would be integrated LP+FT '
            "alone. Fix: a backbone with BN (norm_cfg=dict(type='BN', requires_grad=True)), "
            'as the pretrained ResNets have')


def _load_backbone(task: TaskSpec, backbone: Any) -> None:
    """Load the checkpoint's backbone (the keys under the prefix, as every run's Pretrained
    init_cfg does), refusing one that does not hold the whole backbone: mmengine's Pretrained
    init only warns about missing keys, and a half-random backbone would compare the methods on
    a premise nobody chose. The refusal says which prefix would load it."""
    from daft_mm.mm.cli import checkpoint_mismatch
    from daft_mm.mm.safe_load import load_checkpoint_file
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


#: an LP-FT run's weights at its end (``runs/LP-FT/<key>/``), one of WiSE-FT's two endpoints
FINAL_WEIGHTS = 'final_weights.pth'


def _save_weights(model: Any, path: Path) -> None:
    import torch
    from daft_mm.mm.plan import split_model
    state = {k: v.detach().cpu() for k, v in split_model(model)[1].state_dict().items()}
    tmp = path.with_suffix(f'.{os.getpid()}.tmp')
    torch.save({'state_dict': state}, tmp)
    os.replace(tmp, path)


def lpft_endpoints(ctx: Context, point: Point, probe: Point, seed: int,
                   must_exist: bool = True) -> Tuple[Path, Path]:
    """The two ends of one LP-FT run (its probe stage's checkpoint, its final weights): what
    WiSE-FT interpolates. Raises ``FileNotFoundError`` when the run is not there, unless
    ``must_exist`` is False."""
    spec = get_method('LP-FT')
    budgets = stage_budgets(spec, ctx.task.budget, ctx.task.lp_fraction)
    start = ctx.work_dir / 'runs' / 'LP-FT_stage1' / _run_key(
        ctx, stage='lp', point=probe.to_dict(), seed=seed, iters=budgets['lp'])
    start = start / f'iter_{budgets["lp"]}.pth'
    _, work = _run_dir(ctx, Job('LP-FT', point, seed, probe=probe))
    end = work / FINAL_WEIGHTS
    for path in (start, end) if must_exist else ():
        if not path.is_file():
            raise FileNotFoundError(f'WiSE-FT needs {path} (LP-FT seed {seed}): train LP-FT '
                                    'at its choice first (the table does)')
    return start, end


def _run_key(ctx: Context, **parts: Any) -> str:
    return stable_hash(dict(parts, task=ctx.task_key, code=code_hash(),
                            start=file_hash(Path(ctx.task.backbone))))


def lp_stage(ctx: Context, seed: int, iters: int, probe: Point) -> Tuple[str, bool]:
    """LP-FT's probe stage (the LP method at ``probe``, LP's chosen setting, for ``iters``): its
    checkpoint, and whether it was there already."""
    key = _run_key(ctx, stage='lp', point=probe.to_dict(), seed=seed, iters=iters)
    work = ctx.work_dir / 'runs' / 'LP-FT_stage1' / key
    ckpt = work / f'iter_{iters}.pth'
    if _cached(work / 'done.json', key) is not None and ckpt.is_file():
        return str(ckpt), True
    _, last = train(ctx, get_method('LP'), probe, work, iters=iters, seed=seed, stage='lp')
    atomic_write_json(str(work / 'done.json'), dict(key=key, result={'checkpoint': last}))
    return last, False


def _stage(ctx: Context, job: Job) -> Tuple[MethodSpec, Dict[str, int], int, int]:
    """The method, its stage budgets, the iterations of its (last) trained stage and where this
    job stops in it."""
    spec = get_method(job.method)
    budgets = stage_budgets(spec, job.budget or ctx.task.budget, ctx.task.lp_fraction)
    length = budgets['ft' if spec.lp_first else spec.recipe]
    return spec, budgets, length, min(job.iters or length, length)


def _run_dir(ctx: Context, job: Job) -> Tuple[str, Path]:
    spec, budgets, _, _ = _stage(ctx, job)
    if spec.lp_first and job.probe is None:
        raise ValueError(f'{spec.name} needs the setting of its probe stage (LP\'s choice)')
    key = _run_key(ctx, method=spec.name, recipe=spec.recipe, point=job.point.to_dict(),
                   seed=job.seed, budgets=budgets,
                   lp=job.probe.to_dict() if spec.lp_first else None)
    return key, ctx.work_dir / 'runs' / spec.name.replace(' ', '_').replace('/', '') / key


def cached_result(ctx: Context, job: Job) -> Optional[Dict[str, Any]]:
    """A finished trial's result, without training (the driver asks before it starts one)."""
    if job.rerun:
        return None
    if job.kind == 'probe':
        iters = stage_budgets(get_method('LP-FT'), job.budget or ctx.task.budget,
                              ctx.task.lp_fraction)['lp']
        key = _run_key(ctx, stage='lp', point=job.point.to_dict(), seed=job.seed, iters=iters)
        work = ctx.work_dir / 'runs' / 'LP-FT_stage1' / key
        done = _cached(work / 'done.json', key)
        return (dict(done, kind='probe', iterations=0, reused=True)
                if done is not None and (work / f'iter_{iters}.pth').is_file() else None)
    key, work = _run_dir(ctx, job)
    _, _, length, stop = _stage(ctx, job)
    cached = _cached(work / ('result.json' if stop == length else f'rung_{stop}.json'), key)
    return None if cached is None else dict(cached, iterations=0, reused=True)


def run_trial(ctx: Context, job: Job) -> Dict[str, Any]:
    """Run one trial in this process, or reuse its cached result. A trial to the end of the
    budget is evaluated on everything (ID-val, ID test, OOD, feature similarity); one that stops
    at a rung on ID-val alone, and keeps its checkpoint for the next rung. ``iterations``: what
    this call trained."""
    cached = cached_result(ctx, job)
    if cached is not None:
        return cached
    t0 = time.time()
    if job.kind == 'probe':
        iters = stage_budgets(get_method('LP-FT'), job.budget or ctx.task.budget,
                              ctx.task.lp_fraction)['lp']
        ckpt, _ = lp_stage(ctx, job.seed, iters, job.point)
        return dict(kind='probe', checkpoint=ckpt, iterations=iters, reused=False,
                    seconds=time.time() - t0)
    spec, budgets, length, stop = _stage(ctx, job)
    key, work = _run_dir(ctx, job)
    start = job.start
    resume = work / f'rung_{start}.pth'
    if start and not resume.is_file():  # removed by hand: the run is a prefix, train it again
        start = 0
    load_from, probe_trained = (str(resume) if start else None), 0
    if spec.lp_first and not start:  # a fresh LP-FT run starts from its probe stage
        load_from, reused = lp_stage(ctx, job.seed, budgets['lp'], job.probe)
        probe_trained = 0 if reused else budgets['lp']
    trained = stop - start + probe_trained
    part = work / f'part_{start}_{stop}'
    model, last = train(ctx, spec, job.point, part, iters=stop, seed=job.seed,
                        load_from=load_from, schedule=length, resume=bool(start))
    if stop == length:
        if spec.lp_first:  # WiSE-FT mixes the two ends of this run: keep the end's weights
            _save_weights(model, work / FINAL_WEIGHTS)
        result = evaluate(model, ctx)
        result.update(method=spec.name, setting=job.point.to_dict(), seed=job.seed,
                      budgets=budgets, lp_setting=job.probe.to_dict() if spec.lp_first else None,
                      seconds=time.time() - t0)
        atomic_write_json(str(work / 'result.json'), dict(key=key, result=result), indent=1,
                          default=str)
        for old in work.glob('rung_*.pth'):  # nothing continues from them any more
            old.unlink()
    else:
        result = dict(method=spec.name, setting=job.point.to_dict(), seed=job.seed,
                      iters=stop, id_val=id_val_score(model, ctx),
                      seconds=time.time() - t0)
        os.replace(last, work / f'rung_{stop}.pth')
        atomic_write_json(str(work / f'rung_{stop}.json'), dict(key=key, result=result),
                          indent=1, default=str)
        if start and resume.is_file():
            resume.unlink()  # promoted past it
    shutil.rmtree(part, ignore_errors=True)
    ctx.trained += 1
    return dict(result, iterations=trained, reused=False)


# ------------------------------------------------------------------------------------ workers
_CONTEXTS: Dict[str, Context] = {}


def worker_context(task: TaskSpec, task_key: str, work_dir: Path, threads: int = 1,
                   verbose: bool = False) -> Context:
    """This process's context for ``task`` (built once per process and reused by its trials):
    ``threads`` torch threads, the registries, the pretrained backbone and the evaluation sets
    the driver saved."""
    ctx = _CONTEXTS.get(task_key)
    if ctx is not None:
        return ctx
    import warnings

    import torch
    torch.set_num_threads(max(1, threads))
    warnings.filterwarnings('ignore')
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    init_default_scope(SCOPES[task.kind])
    ctx = Context(task=task, work_dir=Path(work_dir), step=lambda _: None, verbose=verbose,
                  progress_bars=False, task_key=task_key)
    load_pretrained(ctx, eval_sets=False)
    _CONTEXTS[task_key] = ctx
    return ctx
