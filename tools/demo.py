"""The embedded DAFT benchmark: FT, LP, LP-FT and DAFT on generated street scenes, on 2 CPU cores.

What it does, and why each step is there:

1. **Data.** Street scenes with per-pixel labels (daft_mm.mm.datasets.make_cityscapes), written as
   PNGs in the real Cityscapes layout so the stock ``CityscapesDataset`` reads them, in several
   photometric *styles*: a diverse *source* set (many random styles, random class colours), a narrow
   *ID target* set in one style (train / ID-val / ID-test), *OOD target* sets in other styles (the
   same scenes as the ID test, so only the style differs) and the ID test under common corruptions
   (``ImageCorruption`` in the test pipeline, seeded per image).
2. **Pretraining.** The tiny DeepLabV3 (``configs/demo/pretrain_demo.py``) trained on the source set:
   the "pretrained model". Cached under ``<work-dir>/pretrain/<key>/``, the key being a hash of the
   generation and pretraining settings and of the demo configs, so a second run reuses it.
3. **Fine-tuning** on the ID target with ``configs/demo/{ft,lp,lpft,daft}_demo.py`` (which inherit the
   real baseline / DAFT configs and only shrink them), through mmengine's Runner in this process
   (about 5 s per run faster than ``tools/train.py`` subprocesses, which re-import torch and mmseg).
   LP-FT's LP stage is the LP run of the same seed. Learning rates come from
   ``configs/demo/recorded_lrs.json`` (chosen on the ID-val split by ``--sweep``, never on OOD data).
4. **Report.** ID mIoU, mIoU on each OOD set and their mean, and the mean cosine similarity of the
   backbone's deepest features before vs after fine-tuning on the ID test images (per pixel; pooled
   per image in the JSON too), each as mean and sample std over seeds. Printed, and written to
   ``report.json``, ``report.md`` and ``report.png`` in the work dir.

Usage::

    python tools/demo.py                  # the benchmark (~4 min on 2 quiet cores)
    python tools/demo.py --quick          # reduced run for the tests (~1 min)
    python tools/demo.py --sweep          # choose LRs on ID-val, then run with them
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from daft_mm.utils import atomic_save, atomic_write, atomic_write_json  # noqa: E402

DEMO_CONFIGS = REPO / 'configs' / 'demo'
RECORDED_LRS = DEMO_CONFIGS / 'recorded_lrs.json'
METHODS = ('FT', 'LP', 'LP-FT', 'DAFT')
CONFIGS = {'FT': 'ft_demo.py', 'LP': 'lp_demo.py', 'LP-FT': 'lpft_demo.py', 'DAFT': 'daft_demo.py',
           'pretrain': 'pretrain_demo.py'}
#: LR grids of ``--sweep``: the base LR (DAFT's predictors train at 10x it, from its config). Each
#: grid was widened until its best ID-val value lay inside it (the short schedule favours large
#: LRs); LP trains only the heads and DAFT's heads run at 10x, hence their positions.
SWEEP_LRS: Dict[str, Tuple[float, ...]] = {
    'FT': (0.03, 0.1, 0.3, 1.0), 'LP': (0.1, 0.3, 1.0, 3.0), 'LP-FT': (0.03, 0.1, 0.3, 1.0),
    'DAFT': (0.01, 0.03, 0.1, 0.3)}

# ------------------------------------------------------------------------------------ settings
#: The ID target: one narrow look (muted, slightly cool, lower contrast).
ID_STYLE: Dict[str, Any] = dict(saturation=0.6, brightness=0.95, contrast=0.85,
                                color_shift=(-6.0, 0.0, 12.0))
#: OOD targets: other looks of the same scenes as the ID test set.
OOD_STYLES: Dict[str, Dict[str, Any]] = {
    'night': dict(brightness=0.4, saturation=0.7, color_shift=(-4.0, 0.0, 16.0), noise_std=4.0),
    'haze': dict(contrast=0.4, color_shift=(85.0, 85.0, 90.0), blur_sigma=0.8),
    'sunset': dict(saturation=1.3, color_shift=(45.0, 8.0, -40.0)),
}


@dataclass(frozen=True)
class Settings:
    """Everything that decides the data, the pretrained model and the fine-tuning runs."""
    size: Tuple[int, int] = (64, 128)
    gen_seed: int = 0
    source_styles: int = 8
    source_per_style: int = 24
    id_train: int = 48
    id_val: int = 24
    test: int = 32
    corruptions: Tuple[Tuple[str, int], ...] = (('gaussian_noise', 3), ('motion_blur', 3),
                                                ('fog', 3))
    pretrain_iters: int = 600
    pretrain_lr: float = 0.05
    finetune_iters: int = 150
    batch_size: int = 8

    def data_key(self) -> str:
        fields = ('size', 'gen_seed', 'source_styles', 'source_per_style', 'id_train', 'id_val',
                  'test')
        spec = {k: getattr(self, k) for k in fields}
        spec.update(id_style=ID_STYLE, ood_styles=OOD_STYLES, generator=_file_hash(
            REPO / 'daft_mm' / 'mm' / 'datasets' / 'synthetic.py'))
        return _hash(spec)

    def pretrain_key(self) -> str:
        spec = dict(data=self.data_key(), iters=self.pretrain_iters, lr=self.pretrain_lr,
                    batch_size=self.batch_size,
                    configs=[_file_hash(DEMO_CONFIGS / 'pretrain_demo.py'),
                             _file_hash(DEMO_CONFIGS / '_base_' / 'demo_common.py')])
        return _hash(spec)


DEFAULT = Settings()
QUICK = Settings(source_styles=3, source_per_style=4, id_train=8, id_val=4, test=4,
                 corruptions=(('gaussian_noise', 3), ), pretrain_iters=6, finetune_iters=3,
                 batch_size=4)


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _file_hash(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:10] if path.is_file() else 'missing'


# ------------------------------------------------------------------------------------ output
class Progress:
    """One line per step with elapsed time; the training steps add a bar (mmengine ProgressBar)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.time()

    def step(self, what: str) -> None:
        self.done += 1
        print(f'[{self.done}/{self.total} | {self.elapsed()}] {what}', flush=True)

    def note(self, what: str) -> None:
        print(f'    {what}', flush=True)

    def elapsed(self) -> str:
        s = int(time.time() - self.start)
        return f'{s // 60:d}:{s % 60:02d}'


def _training_bar_hook(total: int):
    """A hook drawing an mmengine ProgressBar over the training iterations (log level is WARNING,
    so the LoggerHook stays quiet)."""
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


# ------------------------------------------------------------------------------------ data
@dataclass
class DataRoots:
    source: str
    id: str  # train: ID training, val: ID test
    id_val: str  # val: ID validation (LR choice)
    ood: Dict[str, str] = field(default_factory=dict)  # name -> root (val split)


def source_styles(n: int, seed: int) -> List[Dict[str, Any]]:
    """``n`` random looks for the source set: colours, class palette, contrast, noise, blur."""
    import numpy as np
    from daft_mm.mm.datasets.synthetic import _CS_COLORS  # the generator's class colours
    rng = np.random.default_rng([seed, 7919])
    styles = []
    for _ in range(n):
        palette = {cls: tuple(float(v) for v in np.clip(np.asarray(rgb) + rng.uniform(-40, 40, 3),
                                                          0, 255))
                   for cls, rgb in _CS_COLORS.items()}
        styles.append(dict(
            palette=palette, brightness=float(rng.uniform(0.5, 1.3)),
            contrast=float(rng.uniform(0.5, 1.2)), saturation=float(rng.uniform(0.4, 1.4)),
            color_shift=tuple(float(v) for v in rng.uniform(-40, 40, 3)),
            noise_std=float(rng.uniform(0, 5)), blur_sigma=float(rng.uniform(0, 1.0))))
    return styles


def make_data(root: Path, s: Settings, progress: Progress) -> DataRoots:
    """Generate (or reuse) every set; a ``.complete`` file marks a finished generation."""
    from daft_mm.mm.datasets import make_cityscapes
    roots = DataRoots(source=str(root / 'source'), id=str(root / 'id'),
                      id_val=str(root / 'id_val'),
                      ood={name: str(root / f'ood_{name}') for name in OOD_STYLES})
    marker = root / '.complete'
    if marker.is_file():
        progress.step(f'data: reusing {root}')
        return roots
    t0 = time.time()
    if root.exists():
        shutil.rmtree(root)  # an interrupted generation
    test_seed, val_seed = s.gen_seed + 100, s.gen_seed + 200
    for k, style in enumerate(source_styles(s.source_styles, s.gen_seed)):
        make_cityscapes(roots.source, num_train=s.source_per_style, num_val=0, size=s.size,
                        seed=s.gen_seed + 1000 + k, style=style,
                        cities={'train': (f'source{k:02d}', )})
    make_cityscapes(roots.id, num_train=s.id_train, num_val=s.test, size=s.size, seed=test_seed,
                    style=ID_STYLE)
    make_cityscapes(roots.id_val, num_train=0, num_val=s.id_val, size=s.size, seed=val_seed,
                    style=ID_STYLE)
    for name, style in OOD_STYLES.items():  # same seed as the ID test: same scenes, other look
        make_cityscapes(roots.ood[name], num_train=0, num_val=s.test, size=s.size, seed=test_seed,
                        style=style)
    marker.write_text(json.dumps(asdict(s), indent=1, default=str))
    n = s.source_styles * s.source_per_style + s.id_train + s.id_val + s.test * (1 + len(OOD_STYLES))
    progress.step(f'data: {n} images generated in {time.time() - t0:.1f}s under {root}')
    return roots


# ------------------------------------------------------------------------------------ runs
@dataclass
class Context:
    settings: Settings
    work_dir: Path
    roots: DataRoots
    verbose: bool
    progress: Progress
    eval_sets: Dict[str, List[Any]] = field(default_factory=dict)  # name -> cached batches
    id_val_batches: List[Any] = field(default_factory=list)
    pretrained: str = ''
    pretrained_backbone: Any = None
    pretrained_model: Any = None
    runs: int = 0


def load_demo_config(name: str, ctx: Context, work_dir: Path, options: Mapping[str, Any]):
    """A demo config as ``tools/train.py`` would load it, plus the demo's run settings."""
    from daft_mm.mm.cli import load_config
    opts = {'train_dataloader.batch_size': ctx.settings.batch_size}
    opts.update(options)
    cfg = load_config(str(DEMO_CONFIGS / CONFIGS[name]), opts, work_dir=str(work_dir))
    ctx.runs += 1
    # Several Runners share this process; mmengine keys loggers / visualizers by these names.
    cfg.experiment_name = f'demo_{name}_{os.getpid()}_{ctx.runs}'
    cfg.visualizer['name'] = cfg.experiment_name
    cfg.log_level = 'INFO' if ctx.verbose else 'ERROR'
    # Config.fromfile's format_python_code option: the Runner logs and dumps the config (twice per
    # run, plus once per checkpoint), and yapf-formatting it costs seconds per run on 2 cores.
    object.__setattr__(cfg, '_format_python_code', False)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # evaluated after training
    cfg.default_hooks.pop('visualization', None)
    return cfg


def train(name: str, ctx: Context, work_dir: Path, *, lr: float, iters: int, seed: int,
          data_root: str, load_from: Optional[str]) -> Tuple[Any, str]:
    """Train one config in this process; returns (the trained model, its last checkpoint)."""
    from mmengine.runner import Runner
    options = {'data_root': data_root, 'optim_wrapper.optimizer.lr': lr,
               'train_cfg.max_iters': iters, 'randomness.seed': seed,
               'default_hooks.logger.interval': max(1, min(25, iters))}
    if load_from is not None:
        options['load_from'] = load_from
    cfg = load_demo_config(name, ctx, work_dir, options)
    if work_dir.exists():
        shutil.rmtree(work_dir)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(_training_bar_hook(iters))
    runner.train()
    ckpt = work_dir / f'iter_{iters}.pth'
    if not ckpt.is_file():
        raise RuntimeError(f'training {name} wrote no checkpoint at {ckpt}')
    return runner.model, str(ckpt)


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
    """ID / OOD mIoU and feature similarity to the pretrained backbone (ID test images)."""
    from daft_mm.mm.hooks.distortion_hook import compare_backbones
    scores = {name: miou(model, batches) for name, batches in ctx.eval_sets.items()}
    ood = {k: v for k, v in scores.items() if k != 'ID'}
    inner = getattr(model, 'model', model)  # DAFTModel -> segmentor
    stats, _ = compare_backbones(inner, {'pretrained': ctx.pretrained_backbone,
                                         'finetuned': inner.backbone},
                                 [('pretrained', 'finetuned')], ctx.eval_sets['ID'], levels=(-1, ))
    means = next(iter(stats[('pretrained', 'finetuned')].values())).means()
    return dict(id=scores['ID'], ood=ood, ood_mean=sum(ood.values()) / len(ood),
                cosine=means['pixel_cosine'], cosine_pooled=means['cosine'])


def pretrain(ctx: Context) -> None:
    """Train (or reuse) the pretrained model; load its backbone as the distortion reference."""
    import torch
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint
    s = ctx.settings
    out_dir = ctx.work_dir / 'pretrain' / s.pretrain_key()
    ckpt = out_dir / 'pretrained.pth'
    cfg = load_demo_config('pretrain', ctx, out_dir / 'run', {'data_root': ctx.roots.source})
    unusable = cached_checkpoint_problem(ckpt, s) if ckpt.is_file() else None
    if unusable:
        ctx.progress.note(f'pretraining: the cached {ckpt} {unusable}; pretraining again')
        ckpt.unlink()
    if ckpt.is_file():
        ctx.progress.step(f'pretraining: reusing {ckpt}')
    else:
        t0 = time.time()
        ctx.progress.note(f'pretraining the tiny DeepLabV3 on the source set '
                          f'({s.pretrain_iters} iterations)')
        model, last = train('pretrain', ctx, out_dir / 'run', lr=s.pretrain_lr,
                            iters=s.pretrain_iters, seed=0, data_root=ctx.roots.source,
                            load_from=None)
        # The project's loader: restricted unpickling with the mmengine allow-list on any torch
        # (torch 2.1's own weights_only cannot read a Runner checkpoint's message hub).
        from daft_mm.mm.compat import load_checkpoint_file
        state = load_checkpoint_file(str(last), map_location='cpu')['state_dict']
        # atomically: a kill while saving must not leave a truncated cache that later runs reuse
        atomic_save(lambda f: torch.save({'state_dict': state, 'meta': {'settings': asdict(s)}},
                                         f), str(ckpt))
        shutil.rmtree(out_dir / 'run', ignore_errors=True)
        atomic_write_json(str(out_dir / 'settings.json'), asdict(s), indent=1, default=str)
        ctx.progress.step(f'pretraining: done in {time.time() - t0:.0f}s -> {ckpt}')
    ctx.pretrained = str(ckpt)
    model = MODELS.build(cfg.model)
    load_checkpoint(model, str(ckpt), map_location='cpu', logger='silent')
    build_eval_sets(ctx, cfg)
    ctx.pretrained_backbone = copy.deepcopy(model.model.backbone)
    ctx.pretrained_backbone.eval()  # not chained: mmseg's ResNet.train() returns None
    ctx.pretrained_model = model


def cached_checkpoint_problem(ckpt: Path, s: Settings) -> Optional[str]:
    """Why a cached pretrained checkpoint cannot be reused (None: it can). Caches written before
    saves were atomic may be cut short by a kill; every later run would then fail on them."""
    import torch
    try:
        saved = torch.load(ckpt, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle...: all mean "redo"
        return f'cannot be read ({type(exc).__name__}: {exc}; cut short by a kill?)'
    if not isinstance(saved, dict) or not saved.get('state_dict'):
        return 'holds no state_dict'
    settings = json.loads(json.dumps((saved.get('meta') or {}).get('settings'), default=str))
    if settings != json.loads(json.dumps(asdict(s), default=str)):
        return 'was made with other settings'
    return None


def _run_dir(ctx: Context, method: str, lr: float, seed: int, tag: str) -> Path:
    return ctx.work_dir / tag / f'{method}_lr{lr:g}_seed{seed}'


def _start_checkpoint(method: str, ctx: Context, seed: int, lp_checkpoints: Dict[int, str]) -> str:
    if method != 'LP-FT':
        return ctx.pretrained
    if seed not in lp_checkpoints:
        raise RuntimeError('LP-FT needs the LP run of the same seed first')
    return lp_checkpoints[seed]


def finetune(method: str, ctx: Context, seed: int, lrs: Mapping[str, float],
             lp_checkpoints: Dict[int, str], tag: str = 'runs') -> Any:
    """One fine-tuning run of ``method``; LP-FT starts from the LP checkpoint of the same seed."""
    s = ctx.settings
    work = _run_dir(ctx, method, lrs[method], seed, tag)
    load_from = _start_checkpoint(method, ctx, seed, lp_checkpoints)
    model, ckpt = train(method, ctx, work, lr=lrs[method], iters=s.finetune_iters, seed=seed,
                        data_root=ctx.roots.id, load_from=load_from)
    if method == 'LP':
        lp_checkpoints[seed] = ckpt
    return model


def finetune_and_evaluate(method: str, ctx: Context, seed: int, lrs: Mapping[str, float],
                          lp_checkpoints: Dict[int, str]) -> Tuple[Dict[str, Any], bool]:
    """``(evaluation, reused)``: a run that finished before (its ``result.json`` is written,
    atomically, only after training and evaluation, and names what the run depended on: the
    settings, method, LR, seed, demo configs and the bytes of its start checkpoint) is reused, so
    a rerun after a kill redoes only what was not finished."""
    s = ctx.settings
    work = _run_dir(ctx, method, lrs[method], seed, 'runs')
    start = _start_checkpoint(method, ctx, seed, lp_checkpoints)
    key = _hash(dict(settings=asdict(s), method=method, lr=lrs[method], seed=seed,
                     start=_file_hash(Path(start)),
                     configs=[_file_hash(DEMO_CONFIGS / CONFIGS[method]),
                              _file_hash(DEMO_CONFIGS / '_base_' / 'demo_common.py')]))
    result_file = work / 'result.json'
    ckpt = work / f'iter_{s.finetune_iters}.pth'
    try:
        cached = json.loads(result_file.read_text()) if result_file.is_file() else None
    except ValueError:
        cached = None
    if cached and cached.get('key') == key and ckpt.is_file():
        if method == 'LP':
            lp_checkpoints[seed] = str(ckpt)
        return cached['result'], True
    t0 = time.time()
    model = finetune(method, ctx, seed, lrs, lp_checkpoints)
    result = evaluate(model, ctx)
    result['seconds'] = time.time() - t0
    atomic_write_json(str(result_file), dict(key=key, result=result), indent=1, default=str)
    return result, False


# ------------------------------------------------------------------------------------ LRs
def recorded_lrs(path: Path) -> Tuple[Dict[str, float], str]:
    """The recorded LR choice and a line saying where it came from."""
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist: run `python tools/demo.py --sweep` once '
                                f'to choose the learning rates on the ID-val split')
    rec = json.loads(path.read_text())
    missing = [m for m in METHODS if m not in rec.get('lrs', {})]
    if missing:
        raise ValueError(f'{path} has no learning rate for {missing}; re-run --sweep')
    return {m: float(rec['lrs'][m]) for m in METHODS}, f'{path} ({rec.get("source", "?")})'


def sweep(ctx: Context, grids: Mapping[str, Sequence[float]],
          lp_checkpoints: Dict[int, str]) -> Tuple[Dict[str, Any], Dict[Tuple[str, float], Any]]:
    """Choose each method's LR by ID-val mIoU (seed 0). LP first: LP-FT starts from the LP run at
    LP's chosen LR. Returns the choice and every run's full evaluation, so the main loop reuses
    the seed-0 runs at the chosen LRs (same seed, LR and start: the same run) instead of repeating
    them; ``lp_checkpoints[0]`` becomes the chosen LP run's checkpoint."""
    table: Dict[str, Dict[str, float]] = {}
    chosen: Dict[str, float] = {}
    evaluated: Dict[Tuple[str, float], Any] = {}
    lp_ckpt_by_lr: Dict[float, str] = {}
    for method in ('LP', 'FT', 'LP-FT', 'DAFT'):
        table[method] = {}
        for lr in grids[method]:
            t0 = time.time()
            lp_ckpts: Dict[int, str] = {}
            if method == 'LP-FT':
                lp_ckpts[0] = lp_ckpt_by_lr[chosen['LP']]
            model = finetune(method, ctx, 0, dict(chosen, **{method: lr}), lp_ckpts, tag='sweep')
            if method == 'LP':
                lp_ckpt_by_lr[lr] = lp_ckpts[0]
            table[method][f'{lr:g}'] = score = miou(model, ctx.id_val_batches)
            evaluated[(method, lr)] = dict(evaluate(model, ctx), seconds=time.time() - t0)
            ctx.progress.step(f'sweep {method:5s} lr={lr:g}: ID-val mIoU {score:.2f}')
        chosen[method] = float(max(table[method], key=lambda k: table[method][k]))
    lp_checkpoints[0] = lp_ckpt_by_lr[chosen['LP']]
    return dict(lrs={m: chosen[m] for m in METHODS}, id_val_miou=table), evaluated


# ------------------------------------------------------------------------------------ report
def _stat(values: Sequence[float]) -> Dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {'mean': mean, 'std': std, 'values': list(values)}


def summarize(results: Dict[str, List[Dict[str, Any]]], ood_names: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for method, runs in results.items():
        out[method] = {
            'id_miou': _stat([r['id'] for r in runs]),
            'ood_miou': {name: _stat([r['ood'][name] for r in runs]) for name in ood_names},
            'ood_mean_miou': _stat([r['ood_mean'] for r in runs]),
            'cosine_similarity': _stat([r['cosine'] for r in runs]),
            'cosine_similarity_pooled': _stat([r['cosine_pooled'] for r in runs]),
        }
    return out


def _fmt(stat: Mapping[str, Any], digits: int = 2) -> str:
    """``mean ± std``; one seed has no spread, so just the value (never a made-up ± 0.00)."""
    if len(stat.get('values', ())) == 1:
        return f'{stat["mean"]:.{digits}f}'
    return f'{stat["mean"]:.{digits}f} ± {stat["std"]:.{digits}f}'


def report_title(quick: bool, n_seeds: int) -> str:
    """Says how much a report can be trusted: a --quick run is a smoke test, one seed has no
    spread."""
    parts = []
    if quick:
        parts.append('--quick smoke run (reduced data and schedule, not the benchmark)')
    parts.append('1 seed, no spread' if n_seeds == 1 else f'mean ± std over {n_seeds} seeds')
    return 'daft-mm demo report: ' + '; '.join(parts)


def markdown_table(summary: Mapping[str, Any], ood_names: Sequence[str],
                   pretrained: Optional[Mapping[str, Any]] = None) -> str:
    head = ['Method', 'ID mIoU'] + list(ood_names) + ['OOD mean', 'feature cos']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    if pretrained is not None:
        row = ['pretrained (no FT)', f'{pretrained["id"]:.2f}']
        row += [f'{pretrained["ood"][n]:.2f}' for n in ood_names]
        row += [f'{pretrained["ood_mean"]:.2f}', '1']
        lines.append('| ' + ' | '.join(row) + ' |')
    for method, m in summary.items():
        row = [method, _fmt(m['id_miou'])] + [_fmt(m['ood_miou'][n]) for n in ood_names]
        row += [_fmt(m['ood_mean_miou']), _fmt(m['cosine_similarity'], 4)]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def plot(summary: Mapping[str, Any], out: Path, n_seeds: int,
         pretrained: Optional[Mapping[str, Any]] = None, title: str = '') -> List[str]:
    """ID and OOD-mean bars per method with the pretrained model's levels as lines (so
    "better than pretrained" is visible at a glance), and feature similarity; returns the
    labels of the reference lines."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    methods = list(summary)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={'width_ratios': [2, 1]})
    width = 0.38
    for i, (key, label) in enumerate((('id_miou', 'ID'), ('ood_mean_miou', 'OOD mean'))):
        xs = [j + (i - 0.5) * width for j in range(len(methods))]
        ax.bar(xs, [summary[m][key]['mean'] for m in methods], width,
               yerr=[summary[m][key]['std'] for m in methods], capsize=3, label=label)
    lines = []
    if pretrained is not None:
        colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
        for i, (key, label) in enumerate((('id', 'ID'), ('ood_mean', 'OOD mean'))):
            text = f'pretrained {label} ({pretrained[key]:.2f})'
            ax.axhline(pretrained[key], color=colours[i], linestyle='--', linewidth=1.2,
                       label=text)
            lines.append(text)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel('mIoU (%)')
    spread = 'one seed, no error bars' if n_seeds == 1 else f'mean ± std over {n_seeds} seeds'
    ax.set_title(f'mIoU ({spread})', fontsize=10)
    ax.legend(fontsize=8)
    ax2.bar(range(len(methods)), [summary[m]['cosine_similarity']['mean'] for m in methods],
            yerr=[summary[m]['cosine_similarity']['std'] for m in methods], capsize=3,
            color='tab:gray')
    ax2.set_xticks(range(len(methods)), methods)
    ax2.set_ylabel('cosine similarity')
    ax2.set_title('backbone features vs pretrained', fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return lines


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true',
                   help='reduced run (tiny sets, a few iterations, 1 seed) for tests')
    p.add_argument('--work-dir', default='work_dirs/demo',
                   help='where data, the cached pretrained model, runs and the report go')
    p.add_argument('--seeds', type=int, default=None,
                   help='fine-tuning seeds per method (default 3; --quick: 1)')
    p.add_argument('--sweep', action='store_true',
                   help='choose each method\'s LR on the ID-val split (seed 0, grids '
                   f'{SWEEP_LRS}) and use it; writes <work-dir>/lr_sweep.json, to be copied to '
                   'configs/demo/recorded_lrs.json')
    p.add_argument('--lrs', default=str(RECORDED_LRS),
                   help='recorded LR choice to use without --sweep (default: %(default)s)')
    p.add_argument('--verbose', action='store_true', help='mmengine INFO logs of every run')
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.seeds < 1:
        p.error(f'--seeds must be >= 1, got {args.seeds}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    t_start = time.time()
    warnings.filterwarnings('ignore')  # mmengine/mmseg deprecation chatter; errors still raise
    import daft_mm.mm  # noqa: F401  (registers DAFTHook, DAFTModel, ImageCorruption)
    import torch
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')

    s = QUICK if args.quick else DEFAULT
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    n_sweep = sum(len(g) for g in SWEEP_LRS.values()) if args.sweep else 0
    total = 2 + args.seeds * len(METHODS) - (len(METHODS) if args.sweep else 0) + n_sweep
    progress = Progress(total)
    print(f'daft-mm demo ({"quick" if args.quick else "default"}): {args.seeds} seed(s), '
          f'work dir {work_dir}, torch threads {torch.get_num_threads()}', flush=True)

    roots = make_data(work_dir / 'data' / s.data_key(), s, progress)
    ctx = Context(settings=s, work_dir=work_dir, roots=roots, verbose=args.verbose,
                  progress=progress)
    pretrain(ctx)
    pre_scores = evaluate(ctx.pretrained_model, ctx)
    progress.note(f'pretrained model: ID {pre_scores["id"]:.2f}  OOD mean '
                  f'{pre_scores["ood_mean"]:.2f} mIoU')

    lp_checkpoints: Dict[int, str] = {}
    swept: Dict[Tuple[str, float], Any] = {}
    if args.sweep:
        chosen, swept = sweep(ctx, SWEEP_LRS, lp_checkpoints)
        record = dict(chosen, source=f'tools/demo.py --sweep{" --quick" if args.quick else ""}, '
                      f'{time.strftime("%Y-%m-%d")}, seed 0, best ID-val mIoU (never OOD data)',
                      settings=asdict(s))
        atomic_write_json(str(work_dir / 'lr_sweep.json'), record, indent=1, default=str)
        lrs, lr_source = chosen['lrs'], f'--sweep (written to {work_dir / "lr_sweep.json"})'
    else:
        lrs, lr_source = recorded_lrs(Path(args.lrs))
    progress.note(f'learning rates {lrs} from {lr_source}')

    results: Dict[str, List[Dict[str, Any]]] = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for method in METHODS:
            if seed == 0 and (method, lrs[method]) in swept:
                results[method].append(swept[(method, lrs[method])])
                continue
            r, reused = finetune_and_evaluate(method, ctx, seed, lrs, lp_checkpoints)
            results[method].append(r)
            progress.step(f'{method:5s} seed {seed}: ID {r["id"]:.2f}  OOD mean '
                          f'{r["ood_mean"]:.2f}  cos {r["cosine"]:.4f}  ({r["seconds"]:.0f}s'
                          + (', finished by an earlier run: reused)' if reused else ')'))

    ood_names = list(next(iter(results.values()))[0]['ood'])
    summary = summarize(results, ood_names)
    report = {
        'metric': 'mIoU (%) on 19 Cityscapes classes (classes absent from a set and never '
                  'predicted are skipped, as in mmseg IoUMetric); spread = sample std over seeds',
        'cosine_similarity': 'mean per-pixel cosine of the deepest backbone features, fine-tuned '
                             'vs pretrained, on the ID test images (pooled: per-image pooled '
                             'features)',
        'seeds': list(range(args.seeds)),
        'ood_sets': ood_names,
        'learning_rates': lrs,
        'learning_rates_source': lr_source,
        'settings': asdict(s),
        'pretrained_checkpoint': ctx.pretrained,
        'pretrained_model': pre_scores,
        'methods': summary,
        'runs': results,
        'seconds': time.time() - t_start,
    }
    title = report_title(args.quick, args.seeds)
    report['title'] = title
    atomic_write_json(str(work_dir / 'report.json'), report, indent=1, default=str)
    table = markdown_table(summary, ood_names, pre_scores)
    md = (f'# {title}\n\n{report["metric"]}. Feature cos: {report["cosine_similarity"]}.'
          f'\n\nSeeds: {args.seeds}. Learning rates: {lrs}, from {lr_source}.\n\n{table}\n\n'
          f'![bar chart](report.png)\n\nTotal time: {report["seconds"]:.0f}s.\n')
    with atomic_write(str(work_dir / 'report.md')) as f:
        f.write(md)
    plot(summary, work_dir / 'report.png', args.seeds, pre_scores, title)
    print('\n' + table + '\n', flush=True)
    print(f'report: {work_dir / "report.md"}, {work_dir / "report.json"}, '
          f'{work_dir / "report.png"} ({report["seconds"]:.0f}s)', flush=True)
    return report


if __name__ == '__main__':
    main()
