"""Training and evaluating one benchmark run with mmengine's Runner, in this process.

Runs are cached: a run's ``result.json`` is written (atomically) only after training and
evaluation, keyed by everything the run depends on (settings, method, setting, seed, budget, the
demo configs, the sources of the packages it executes, the bytes of its start checkpoint), so a rerun, or the default run after a search,
reuses finished runs instead of repeating them.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from daft_mm.utils import atomic_save, atomic_write_json

from .data import COARSE_CATEGORIES, REPO, DataRoots, Settings, file_hash, stable_hash
from .methods import MethodSpec, Point, get_method, stage_budgets

__all__ = ['DEMO_CONFIGS', 'Context', 'RunPool', 'pretrain', 'run_point', 'miou']

DEMO_CONFIGS = REPO / 'configs' / 'demo'
PRETRAIN_CONFIG = 'pretrain_demo.py'


@dataclass
class Context:
    """What every run of one experiment shares."""
    settings: Settings
    work_dir: Path
    roots: DataRoots
    step: Callable[[str], None]  # a finished step, shown as progress
    verbose: bool = False
    progress_bars: bool = True  # an mmengine ProgressBar over each run's iterations
    eval_sets: Dict[str, List[Any]] = field(default_factory=dict)  # name -> cached batches
    id_val_batches: List[Any] = field(default_factory=list)
    backbone_checkpoint: str = ''
    pretrained_backbone: Any = None
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


def load_demo_config(config: str, ctx: Context, work_dir: Path, options: Mapping[str, Any]):
    """A demo config as ``tools/train.py`` would load it, plus the benchmark's run settings."""
    from daft_mm.mm.cli import load_config
    opts = {'train_dataloader.batch_size': ctx.settings.batch_size}
    opts.update(options)
    cfg = load_config(str(DEMO_CONFIGS / config), opts, work_dir=str(work_dir))
    ctx.runs += 1
    # Several Runners share this process; mmengine keys loggers / visualizers by these names.
    cfg.experiment_name = f'demo_{Path(config).stem}_{os.getpid()}_{ctx.runs}'
    cfg.visualizer['name'] = cfg.experiment_name
    cfg.log_level = 'INFO' if ctx.verbose else 'ERROR'
    # The Runner dumps the config several times per run; yapf-formatting it costs seconds.
    object.__setattr__(cfg, '_format_python_code', False)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # evaluated after training
    cfg.default_hooks.pop('visualization', None)
    return cfg


def train(config: str, ctx: Context, work_dir: Path, *, iters: int, seed: int, data_root: str,
          options: Mapping[str, Any]) -> Tuple[Any, str]:
    """Train one config in this process; returns (the trained model, its last checkpoint)."""
    from mmengine.runner import Runner
    opts = {'data_root': data_root, 'train_cfg.max_iters': iters, 'randomness.seed': seed,
            'default_hooks.logger.interval': max(1, min(25, iters))}
    opts.update(options)
    cfg = load_demo_config(config, ctx, work_dir, opts)
    if work_dir.exists():
        shutil.rmtree(work_dir)
    runner = Runner.from_cfg(cfg)
    if ctx.progress_bars:
        runner.register_hook(_training_bar_hook(iters))
    runner.train()
    ckpt = work_dir / f'iter_{iters}.pth'
    if not ckpt.is_file():
        raise RuntimeError(f'training {config} wrote no checkpoint at {ckpt}')
    return runner.model, str(ckpt)


# ------------------------------------------------------------------------------------ evaluation
def build_eval_sets(ctx: Context, cfg: Any) -> None:
    """Load every evaluation set once through the demo test pipeline and keep the batches: the
    pipeline is deterministic (corruptions are seeded per image), and every model sees the same."""
    from mmengine.runner import Runner
    test_pipeline = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)

    def loader(root: str, pipeline: List[dict]) -> List[Any]:
        dl = Runner.build_dataloader(dict(
            batch_size=8, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
            dataset=dict(type='CityscapesDataset', data_root=root,
                         data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
                         pipeline=pipeline)))
        return list(dl)

    ctx.eval_sets['ID'] = loader(ctx.roots.id, test_pipeline)
    for name, root in ctx.roots.ood.items():
        ctx.eval_sets[name] = loader(root, test_pipeline)
    for corruption, severity in ctx.settings.corruptions:
        pipeline = copy.deepcopy(test_pipeline)
        pipeline.insert(1, dict(type='ImageCorruption', corruption=corruption, severity=severity))
        ctx.eval_sets[f'{corruption}-{severity}'] = loader(ctx.roots.id, pipeline)
    ctx.id_val_batches = loader(ctx.roots.id_val, test_pipeline)


def miou(model: Any, batches: List[Any]) -> float:
    """mIoU (%) of ``model`` on cached batches, with mmseg's IoUMetric."""
    import torch
    from mmengine.evaluator import Evaluator
    from mmseg.datasets import CityscapesDataset
    from mmseg.evaluation import IoUMetric
    evaluator = Evaluator([IoUMetric(iou_metrics=['mIoU'])])
    evaluator.dataset_meta = dict(CityscapesDataset.METAINFO)
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
    scores = {name: miou(model, batches) for name, batches in ctx.eval_sets.items()}
    ood = {k: v for k, v in scores.items() if k != 'ID'}
    inner = getattr(model, 'model', model)  # DAFTModel -> segmentor
    stats, _ = compare_backbones(inner, {'pretrained': ctx.pretrained_backbone,
                                         'finetuned': inner.backbone},
                                 [('pretrained', 'finetuned')], ctx.eval_sets['ID'], levels=(-1, ))
    means = next(iter(stats[('pretrained', 'finetuned')].values())).means()
    return dict(id_val=miou(model, ctx.id_val_batches), id=scores['ID'], ood=ood,
                ood_mean=sum(ood.values()) / len(ood), cosine=means['pixel_cosine'],
                cosine_pooled=means['cosine'])


# ------------------------------------------------------------------------------------ pretraining
def _backbone_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in state.items() if k.startswith('backbone.')}


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


def _coarse_head_options() -> Dict[str, Any]:
    n = len(COARSE_CATEGORIES)
    return {'model.model.decode_head.num_classes': n, 'model.model.auxiliary_head.num_classes': n}


def pretrain(ctx: Context) -> None:
    """Pretrain (or reuse) the backbone on the coarse-labelled source set; keep only the backbone
    (the fine-tuning task has other classes, so its decode head is new for every method), and
    load it as the reference for feature distortion."""
    import torch
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint
    s = ctx.settings
    out_dir = ctx.work_dir / 'pretrain' / s.pretrain_key()
    ckpt = out_dir / 'backbone.pth'
    unusable = cached_checkpoint_problem(ckpt, s) if ckpt.is_file() else None
    if unusable:
        ctx.step(f'pretraining: the cached {ckpt} {unusable}; pretraining again')
        ckpt.unlink()
    if ckpt.is_file():
        ctx.step(f'pretraining: reusing {ckpt}')
    else:
        t0 = time.time()
        _, last = train(PRETRAIN_CONFIG, ctx, out_dir / 'run', iters=s.pretrain_iters, seed=0,
                        data_root=ctx.roots.source,
                        options=dict(_coarse_head_options(),
                                     **{'optim_wrapper.optimizer.lr': s.pretrain_lr}))
        # The project's loader: restricted unpickling with the mmengine allow-list on any torch.
        from daft_mm.mm.compat import load_checkpoint_file
        state = _backbone_state(load_checkpoint_file(last, map_location='cpu')['state_dict'])
        # atomically: a kill while saving must not leave a truncated cache that later runs reuse
        atomic_save(lambda f: torch.save({'state_dict': state, 'meta': {
            'pretrain_key': s.pretrain_key(), 'settings': asdict(s),
            'source_classes': list(COARSE_CATEGORIES)}}, f), str(ckpt))
        shutil.rmtree(out_dir / 'run', ignore_errors=True)
        atomic_write_json(str(out_dir / 'settings.json'), asdict(s), indent=1, default=str)
        ctx.step(f'pretraining: {s.pretrain_iters} iterations on the coarse source set in '
                 f'{time.time() - t0:.0f}s -> {ckpt}')
    ctx.backbone_checkpoint = str(ckpt)
    cfg = load_demo_config(get_method('FT').config, ctx, ctx.work_dir / 'unused', {})
    model = MODELS.build(cfg.model)
    load_checkpoint(model, str(ckpt), map_location='cpu', logger='silent')
    build_eval_sets(ctx, cfg)
    ctx.pretrained_backbone = copy.deepcopy(model.model.backbone)
    ctx.pretrained_backbone.eval()  # not chained: mmseg's ResNet.train() returns None


# ------------------------------------------------------------------------------------ runs
def run_options(spec: MethodSpec, point: Point) -> Dict[str, Any]:
    """The config options that make a demo config train ``spec`` at ``point``."""
    opts: Dict[str, Any] = {'optim_wrapper.optimizer.lr': point.lr}
    if spec.config == 'daft_demo.py':
        opts['model.method'] = spec.recipe
        ratio = point.ratio if spec.has_ratio else None
        if ratio is not None:
            opts['daft_head_lr_mult'] = ratio
        if point.scope is not None:
            opts['daft_head_modules'] = point.scope
        # converted.pth is for users' runs; the paper protocol's first stage trains at ratio 1
        opts['custom_hooks'] = [dict(type='DAFTHook', save_converted=False,
                                     check_lr=ratio is None or ratio > 1)]
    return opts


def backbone_options(ctx: Context) -> Dict[str, Any]:
    """Start from the pretrained backbone the way a user starts from ImageNet weights: the
    backbone's ``init_cfg``; the decode head keeps its own (fresh) initialisation."""
    return {'model.model.backbone.init_cfg': dict(type='Pretrained', prefix='backbone.',
                                                  checkpoint=ctx.backbone_checkpoint)}


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


def _configs_hash(spec: MethodSpec) -> List[str]:
    return [file_hash(DEMO_CONFIGS / spec.config),
            file_hash(DEMO_CONFIGS / '_base_' / 'demo_common.py'), code_hash()]


def lp_stage(ctx: Context, seed: int, iters: int, probe: Point) -> str:
    """LP-FT's probe stage (the LP method at ``probe``, LP's chosen setting, for ``iters``): its
    checkpoint."""
    spec = get_method('LP')
    key = stable_hash(dict(settings=asdict(ctx.settings), stage='lp', point=probe.to_dict(),
                           seed=seed, iters=iters, configs=_configs_hash(spec),
                           start=file_hash(Path(ctx.backbone_checkpoint))))
    work = ctx.work_dir / 'runs' / 'LP-FT_stage1' / key
    ckpt = work / f'iter_{iters}.pth'
    if _cached(work / 'done.json', key) is not None and ckpt.is_file():
        return str(ckpt)
    _, last = train(spec.config, ctx, work, iters=iters, seed=seed, data_root=ctx.roots.id,
                    options=dict(run_options(spec, probe), **backbone_options(ctx)))
    atomic_write_json(str(work / 'done.json'), dict(key=key, result={'checkpoint': last}))
    return last


def run_point(ctx: Context, spec: MethodSpec, point: Point, seed: int,
              probe: Optional[Point] = None) -> Dict[str, Any]:
    """Train ``spec`` at ``point`` with ``seed`` for the budget and evaluate it (or reuse a
    finished run with the same key). LP-FT's probe stage trains at ``probe`` (LP's chosen
    setting). The result says whether it was reused."""
    s = ctx.settings
    budgets = stage_budgets(spec, s.budget, s.lp_fraction)
    start = ctx.backbone_checkpoint
    lp_setting = None
    if spec.lp_first:
        if probe is None:
            raise ValueError(f'{spec.name} needs the setting of its probe stage (LP\'s choice)')
        lp_setting = probe.to_dict()
    key = stable_hash(dict(settings=asdict(s), method=spec.name, recipe=spec.recipe,
                           point=point.to_dict(), seed=seed, budgets=budgets, lp=lp_setting,
                           configs=_configs_hash(spec), start=file_hash(Path(start))))
    work = ctx.work_dir / 'runs' / spec.name.replace(' ', '_').replace('/', '') / key
    cached = _cached(work / 'result.json', key)
    if cached is not None:
        return dict(cached, reused=True)
    t0 = time.time()
    options = dict(run_options(spec, point), **backbone_options(ctx))
    if spec.lp_first:  # the second stage starts from the whole probed model
        options['load_from'] = lp_stage(ctx, seed, budgets['lp'], probe)
    iters = budgets['ft' if spec.lp_first else spec.recipe]
    model, last = train(spec.config, ctx, work, iters=iters, seed=seed, data_root=ctx.roots.id,
                        options=options)
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


def _init_worker(settings: Settings, work_dir: Path, roots: DataRoots, verbose: bool) -> None:
    """A worker process: one torch thread, the registries, and its own copy of the shared
    context (evaluation sets, the pretrained backbone), built once."""
    import warnings

    import torch
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore')
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    init_default_scope('mmseg')
    ctx = Context(settings=settings, work_dir=work_dir, roots=roots, step=lambda _: None,
                  verbose=verbose, progress_bars=False)
    pretrain(ctx)  # the cached backbone: loads it and the evaluation sets
    _WORKER['ctx'] = ctx


def _work(name: str, point: Point, seed: int, probe: Optional[Point]) -> Dict[str, Any]:
    return run_point(_WORKER['ctx'], get_method(name), point, seed, probe)


def _probe_stage(seed: int, probe: Point) -> str:
    ctx = _WORKER['ctx']
    return lp_stage(ctx, seed, stage_budgets(get_method('LP-FT'), ctx.settings.budget,
                                             ctx.settings.lp_fraction)['lp'], probe)


class RunPool:
    """Runs independent fine-tuning runs side by side in ``workers`` processes of one torch
    thread each (on 2 cores that beats one process with two threads: a tiny model's ops do not
    scale across threads, and two busy OpenMP teams on two cores stall each other). With one
    worker, runs go in this process, one after another."""

    def __init__(self, ctx: Context, workers: int = 1) -> None:
        self.ctx = ctx
        self.workers = workers
        self._pool = None

    def __enter__(self) -> 'RunPool':
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            c = self.ctx
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context('spawn'),
                initializer=_init_worker, initargs=(c.settings, c.work_dir, c.roots, c.verbose))
        return self._pool

    def run(self, tasks: List[Task],
            done: Optional[Callable[[Task, Dict[str, Any]], None]] = None,
            probe: Optional[Point] = None) -> List[Dict[str, Any]]:
        """Results of ``tasks`` in order (each distinct task runs once); ``done`` is called as
        each finishes. ``probe``: LP's chosen setting, the probe stage of LP-FT tasks; those
        stages run first, once per seed, so no two workers train the same one."""
        unique = list(dict.fromkeys(tasks))
        results: Dict[Task, Dict[str, Any]] = {}
        if self.workers <= 1:
            for task in unique:
                results[task] = run_point(self.ctx, get_method(task[0]), task[1], task[2], probe)
                if done is not None:
                    done(task, results[task])
            return [results[t] for t in tasks]
        from concurrent.futures import as_completed
        pool = self._executor()
        lp_seeds = sorted({seed for name, _, seed in unique if get_method(name).lp_first})
        for future in [pool.submit(_probe_stage, seed, probe) for seed in lp_seeds]:
            future.result()
        futures = {pool.submit(_work, *task, probe): task for task in unique}
        for future in as_completed(futures):
            task = futures[future]
            results[task] = future.result()
            self.ctx.trained += not results[task]['reused']
            if done is not None:
                done(task, results[task])
        return [results[t] for t in tasks]
