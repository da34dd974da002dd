"""The classification twin of the embedded benchmark: FT, LP, LP-FT, DAFT and DAFT's ablations
under the premise the methods are made for, small enough for a CPU.

The premise (issue 11): the backbone is pretrained on a *source* task whose label space is not
the target's, so every method starts from the same backbone with a **fresh** ``fc``: standard
init for FT / LP / LP-FT / conversion-only, zero for the recipes that zero the predictors.

* Source task: the shapes of :data:`~daft_mm.classification.demo_data.SOURCE_SHAPES` plus
  ``cross`` and ``diamond``, drawn in every style (plain, striped, noisy): the stand-in for a
  broad pretraining set that has seen many looks but not the target classes.
* Target (ID): ``circle`` / ``square`` / ``triangle`` in the plain style: train, an ID
  validation split (the only thing any choice looks at) and an ID test split.
* OOD: the target classes in the striped and noisy styles, generated only after every choice
  is made (:func:`make_ood_data` is not called before selection ends).
* Budgets: every method trains ``iters`` iterations; LP-FT splits them between its stages.
* Selection (:func:`daft_mm.benchmark.selection.grid_search`, as in the segmentation
  benchmark): each method's LR (and head ratio, for the recipes with one) on ID-val accuracy,
  ties to the lower ID-val loss, with one seed; a best point on the edge of the grid widens the
  grid (the ratio never below 1). The top ``finalists`` points (default 1) run with every seed
  and the best mean wins; those runs of the chosen point are its final runs.

Everything is in memory and single-process; :func:`run_classification_benchmark` returns a
JSON-able report, :func:`format_table` prints it.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from daft_mm.classification import (IMAGENET_MEAN, IMAGENET_STD, build_resnet, evaluate_loss,
                                    finetune)
from daft_mm.classification.demo_data import OOD_STYLES, STYLES, render_images
from daft_mm.core import HEAD_SCOPES, get_recipe

from .methods import Point
from .report import stat
from .selection import Axis, grid_search, one_at_a_time

__all__ = ['METHODS', 'ClassificationBenchmarkConfig', 'Split', 'make_source_data',
           'make_target_data', 'make_ood_data', 'pretrain', 'fresh_model', 'stage_budget',
           'train_one',
           'search_axes', 'point_settings', 'selection_score', 'select_settings',
           'run_classification_benchmark', 'format_table',
           'quick_config', 'replace_config']

#: The methods and ablations, in report order.
METHODS = ('ft', 'lp', 'lp-ft', 'daft', 'daft-no-convert', 'daft-convert-only')
Log = Callable[[str], None]


@dataclass(frozen=True)
class ClassificationBenchmarkConfig:
    """Everything a run depends on; stored in the report as is."""

    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    # data
    target_classes: tuple[str, ...] = ('circle', 'square', 'triangle')
    source_classes: tuple[str, ...] = ('cross', 'diamond', 'pentagon', 'hexagon', 'star',
                                       'ring')
    source_styles: tuple[str, ...] = STYLES
    ood_styles: tuple[str, ...] = OOD_STYLES
    image_size: int = 20
    source_per_class: int = 150  # per style
    train_per_class: int = 20
    val_per_class: int = 20
    test_per_class: int = 50
    data_seed: int = 0
    # model and pretraining
    arch: str = 'resnet10'
    width: int = 8
    pretrain_iters: int = 600
    pretrain_lr: float = 0.05
    pretrain_weight_decay: float = 5e-4
    pretrain_seed: int = 0
    # fine-tuning
    iters: int = 100  # the budget of every method (FT's ID-val is flat from 100 to 600)
    lp_fraction: float = 0.5  # LP-FT: share of the budget spent probing
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = 'cosine'
    head_scope: str = 'predictors'
    # selection (ID-val only)
    lr_grid: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    lp_lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    ratio_grid: tuple[float, ...] = (10.0, 100.0, 1000.0)
    widen: int = 2  # new values an axis may take past its edges
    finalists: int = 1  # top grid points run with every seed; the best mean wins

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f'unknown methods {unknown}; choose from {METHODS}')
        if 'lp-ft' in self.methods and 'lp' not in self.methods:
            raise ValueError("'lp-ft' probes at LP's chosen LR, so 'lp' must be run too")
        if self.head_scope not in HEAD_SCOPES:
            raise ValueError(f'head_scope must be one of {HEAD_SCOPES}')
        if not self.seeds:
            raise ValueError('give at least one seed')
        if self.finalists < 1 or self.widen < 0:
            raise ValueError('need finalists >= 1 and widen >= 0')
        if not 0 < self.lp_fraction < 1 or self.iters < 2:
            raise ValueError('need iters >= 2 and 0 < lp_fraction < 1')
        overlap = set(self.source_classes) & set(self.target_classes)
        if overlap:
            raise ValueError(f'source and target label spaces must differ; both have {overlap}')


def quick_config(**overrides: Any) -> ClassificationBenchmarkConfig:
    """A seconds-long configuration for tests and smoke runs (not for conclusions)."""
    settings = dict(seeds=(0, 1), image_size=12, source_per_class=6, train_per_class=6,
                    val_per_class=4, test_per_class=4, width=4, pretrain_iters=10, iters=6,
                    batch_size=12, lr_grid=(0.01, 0.1), lp_lr_grid=(0.1,),
                    ratio_grid=(10.0,), widen=0)
    settings.update(overrides)
    return ClassificationBenchmarkConfig(**settings)


# ------------------------------------------------------------------------------------- data
@dataclass
class Split:
    """Normalised images and labels in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def loader(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=batch_size,
                          shuffle=shuffle, drop_last=shuffle and len(self) > batch_size,
                          generator=generator)


def _split(shapes: Sequence[str], styles: Sequence[str], per_class: int, size: int,
           seed: int) -> Split:
    parts = [render_images(shapes, style, per_class, image_size=size, seed=seed + 7919 * i)
             for i, style in enumerate(styles)]
    pixels = torch.from_numpy(np.concatenate([p[0] for p in parts])).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (pixels.permute(0, 3, 1, 2) - mean) / std
    return Split(images.contiguous(), torch.from_numpy(np.concatenate([p[1] for p in parts])))


def make_source_data(cfg: ClassificationBenchmarkConfig) -> dict[str, Split]:
    """The pretraining task: source classes in every source style (train and a small val)."""
    seed = cfg.data_seed * 1000
    return {'train': _split(cfg.source_classes, cfg.source_styles, cfg.source_per_class,
                            cfg.image_size, seed + 1),
            'val': _split(cfg.source_classes, cfg.source_styles,
                          max(2, cfg.source_per_class // 4), cfg.image_size, seed + 2)}


def make_target_data(cfg: ClassificationBenchmarkConfig) -> dict[str, Split]:
    """ID target splits: train, val (for every choice) and test. No OOD data here."""
    seed = cfg.data_seed * 1000
    sizes = {'train': cfg.train_per_class, 'val': cfg.val_per_class,
             'test': cfg.test_per_class}
    return {name: _split(cfg.target_classes, ('id',), n, cfg.image_size, seed + 10 + i)
            for i, (name, n) in enumerate(sizes.items())}


def make_ood_data(cfg: ClassificationBenchmarkConfig) -> dict[str, Split]:
    """The OOD test sets; the benchmark calls this only after selection has ended."""
    seed = cfg.data_seed * 1000
    return {style: _split(cfg.target_classes, (style,), cfg.test_per_class, cfg.image_size,
                          seed + 100 + i)
            for i, style in enumerate(cfg.ood_styles)}


# ------------------------------------------------------------------------------------- models
def pretrain(cfg: ClassificationBenchmarkConfig, source: Mapping[str, Split],
             log: Log | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train a ResNet on the source task; return its state dict and a record."""
    torch.manual_seed(cfg.pretrain_seed)
    model = build_resnet(cfg.arch, len(cfg.source_classes), base_width=cfg.width,
                         small_input=True)
    start = time.perf_counter()
    run = finetune(model, source['train'].loader(2 * cfg.batch_size, shuffle=True,
                                                 seed=cfg.pretrain_seed),
                   method='ft', iters=cfg.pretrain_iters, lr=cfg.pretrain_lr,
                   momentum=cfg.momentum, weight_decay=cfg.pretrain_weight_decay,
                   schedule='cosine', seed=cfg.pretrain_seed)
    accuracy, _ = evaluate_loss(model, source['val'].loader(256))
    record = {'task': 'source shapes, all source styles', 'classes': list(cfg.source_classes),
              'styles': list(cfg.source_styles), 'train_images': len(source['train']),
              'iters': cfg.pretrain_iters, 'lr': cfg.pretrain_lr,
              'source_val_accuracy': accuracy, 'final_loss': run.stages[-1].losses[-1],
              'seconds': time.perf_counter() - start}
    if log is not None:
        log(f'pretrained on {len(cfg.source_classes)} source classes: source val '
            f'{accuracy:.3f} ({record["seconds"]:.1f} s)')
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, record


def fresh_model(cfg: ClassificationBenchmarkConfig, backbone: Mapping[str, torch.Tensor],
                seed: int) -> nn.Module:
    """The pretrained backbone with a fresh, standard-initialised ``fc`` drawn from ``seed``.

    The source ``fc`` (another label space) is never loaded; runs with the same seed share the
    same fresh ``fc``, so the methods are compared on paired starting points.
    """
    torch.manual_seed(seed)
    model = build_resnet(cfg.arch, len(cfg.target_classes), base_width=cfg.width,
                         small_input=True)
    state = {k: v for k, v in backbone.items() if not k.startswith('fc.')}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {'fc.weight', 'fc.bias'}:
        raise RuntimeError(f'backbone does not fit: {result}')
    return model


# ------------------------------------------------------------------------------------- budgets
def stage_budget(cfg: ClassificationBenchmarkConfig, method: str) -> dict[str, Any]:
    """How a method spends the shared budget: ``{'stages': [...], 'total_iters': ...}``."""
    recipe = get_recipe(method)
    iters = recipe.stage_iterations(cfg.iters, cfg.lp_fraction)  # LP-FT: the probe's share first
    return {'stages': [{'name': s.name, 'iters': n} for s, n in zip(recipe.stages, iters)],
            'total_iters': sum(iters), 'budget': cfg.iters,
            'bn_conversion': 'one forward pass over the ID train set, no update'
                             if recipe.uses_bn_conversion else None}


# ------------------------------------------------------------------------------------- runs
def _has_ratio(method: str) -> bool:
    return any(stage.head_lr_mult != 1.0 for stage in get_recipe(method).stages)


def train_one(cfg: ClassificationBenchmarkConfig, method: str, settings: Mapping[str, float],
           seed: int, backbone: Mapping[str, torch.Tensor], train: Split,
           on_step: Callable | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """One fine-tuning run from a fresh model: ``(trained model, record of its stages)``."""
    model = fresh_model(cfg, backbone, seed)
    stages = stage_budget(cfg, method)['stages']
    start = time.perf_counter()
    run = finetune(model, train.loader(cfg.batch_size, shuffle=True, seed=seed), method=method,
                   iters=stages[-1]['iters'], lp_iters=stages[0]['iters'],
                   lr=settings['lr'], lp_lr=settings.get('lp_lr'),
                   head_lr_mult=settings.get('head_lr_mult'), head_scope=cfg.head_scope,
                   momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                   schedule=cfg.schedule, seed=seed, on_step=on_step,
                   # the statistics pass reads every training image once (the training loader
                   # drops the last incomplete batch)
                   bn_loader=train.loader(cfg.batch_size))
    record = {'stages': [{'name': s.name, 'iters': s.iters, 'lr': s.lr, 'head_lr': s.head_lr,
                          'head_scope': s.head_scope, 'head_modules': s.head_modules,
                          'trainable_params': s.trainable_params,
                          'final_loss': s.losses[-1] if s.losses else None}
                         for s in run.stages],
              'train_seconds': time.perf_counter() - start}
    if run.bn_conversion is not None and run.bn_conversion.layers:
        record['bn_images'] = run.bn_conversion.layers[0].num_samples
    return model, record


def _score(model: nn.Module, split: Split) -> tuple[float, float]:
    accuracy, loss = evaluate_loss(model, split.loader(256))
    return accuracy, loss if math.isfinite(loss) else math.inf


def _axis(name: str, values: Sequence[float], floor: float | None = None) -> Axis:
    """A numeric axis that widens geometrically by the spacing of its two largest values (a
    one-value axis stays fixed, as nothing says how far to step)."""
    ordered = sorted(values)
    step = ordered[-1] / ordered[-2] if len(ordered) > 1 else None
    return Axis(name, tuple(values), step=step, floor=floor)


def search_axes(cfg: ClassificationBenchmarkConfig, method: str) -> list[Axis]:
    """The axes swept for ``method`` (fields of :class:`~daft_mm.benchmark.methods.Point`):
    ``lr`` always, ``ratio`` (the head LR multiplier) where the recipe has one. LP sweeps its
    probe LR; LP-FT sweeps its FT LR (the probe uses LP's choice). The ratio never widens below
    1: there the head is slower than the backbone, which is no longer the method."""
    axes = [_axis('lr', cfg.lp_lr_grid if method == 'lp' else cfg.lr_grid)]
    if _has_ratio(method):
        axes.append(_axis('ratio', cfg.ratio_grid, floor=1.0))
    return axes


def point_settings(point: Point, fixed: Mapping[str, float] | None = None) -> dict[str, float]:
    """The :func:`train_one` settings of a search point (``ratio`` is ``head_lr_mult``)."""
    settings = {**(fixed or {}), 'lr': point.lr}
    if point.ratio is not None:
        settings['head_lr_mult'] = point.ratio
    return settings


#: Weight of the ID-val loss in the selection score; small enough to break ties only.
LOSS_TIE_BREAK = 1e-6


def selection_score(accuracy: float, loss: float) -> float:
    """ID-val accuracy, ties to the lower ID-val loss, as one number for
    :func:`~daft_mm.benchmark.selection.grid_search`: ``accuracy - 1e-6 * loss / (1 + loss)``.
    The loss term lies in [0, 1e-6] (an infinite loss gives 1e-6), less than any accuracy
    difference on an ID-val set (times seeds, for a mean) of under a million images, so it only
    orders points of equal accuracy, and orders them by loss (finalists: by the mean of
    ``loss / (1 + loss)`` over seeds)."""
    squashed = 1.0 if not math.isfinite(loss) else loss / (1.0 + loss)
    return accuracy - LOSS_TIE_BREAK * squashed


def select_settings(cfg: ClassificationBenchmarkConfig, method: str,
                    backbone: Mapping[str, torch.Tensor], target: Mapping[str, Split], *,
                    fixed: Mapping[str, float] | None = None, log: Log | None = None,
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, nn.Module]]:
    """Search ``method``'s settings with :func:`~daft_mm.benchmark.selection.grid_search`,
    training on ``target['train']`` and scoring on ``target['val']`` only.

    The grid runs with ``cfg.seeds[0]``; an axis whose best point is on its edge widens
    (``cfg.widen`` new values per axis at most); the top ``cfg.finalists`` points then run with
    every seed and the best mean score (:func:`selection_score`) wins. Returns
    ``(chosen, grid records, {record index: trained model})``: one grid record per point (its
    ``cfg.seeds[0]`` run); ``chosen['runs']`` holds the chosen point's ``(model, record)`` for
    every seed, its final runs.
    """
    axes = search_axes(cfg, method)
    first = cfg.seeds[0]
    runs: dict[tuple[Point, int], tuple[nn.Module, dict[str, Any]]] = {}

    def score(point: Point, seed: int) -> float:
        settings = point_settings(point, fixed)
        model, record = train_one(cfg, method, settings, seed, backbone, target['train'])
        accuracy, loss = _score(model, target['val'])
        record = {'settings': settings, 'id_val': accuracy, 'id_val_loss': loss,
                  'widened': any(getattr(point, a.name) not in a.values for a in axes),
                  'seed': seed, **record}
        runs[point, seed] = (model, record)
        if log is not None:
            shown = ', '.join(f'{k}={v:g}' for k, v in settings.items())
            log(f'  select {method} [{shown}] seed {seed}: id_val {accuracy:.3f} loss '
                f'{loss:.3f} ({record["train_seconds"]:.1f} s)')
        return selection_score(accuracy, loss)

    result = grid_search(one_at_a_time(score), axes, seeds=cfg.seeds,
                         finalists=cfg.finalists, max_widen=cfg.widen)
    records, models = [], {}
    for point, by_seed in result.scores.items():  # in the order tried
        model, record = runs[point, first]
        record = dict(record, chosen=point == result.chosen,
                      finalist=point in result.finalists)
        if len(by_seed) > 1:  # a finalist: its ID-val accuracy with every seed
            record['id_val_by_seed'] = {str(s): runs[point, s][1]['id_val']
                                        for s in sorted(by_seed)}
        models[len(records)] = model
        records.append(record)
    chosen = {'settings': point_settings(result.chosen, fixed), 'on_edge': bool(result.on_edge),
              'widened': list(result.widened),
              'runs': {seed: runs[result.chosen, seed] for seed in cfg.seeds}}
    return chosen, records, models


def _stat(values: Sequence[float]) -> dict[str, Any]:
    """:func:`~daft_mm.benchmark.report.stat` (mean, sample std, values) plus the count."""
    return {**stat(values), 'n': len(values)}


def _evaluate_all(model: nn.Module, target: Mapping[str, Split],
                  ood: Mapping[str, Split]) -> dict[str, float]:
    scores = {'id_val': _score(model, target['val'])[0],
              'id_test': _score(model, target['test'])[0]}
    scores.update({f'ood_{name}': _score(model, split)[0] for name, split in ood.items()})
    scores['ood_mean'] = statistics.fmean(scores[f'ood_{name}'] for name in ood)
    return scores


def run_classification_benchmark(
        cfg: ClassificationBenchmarkConfig | None = None, *, log: Log | None = print,
        ood_data: Callable[[ClassificationBenchmarkConfig], Mapping[str, Split]] = make_ood_data,
) -> dict[str, Any]:
    """Pretrain, select every method's settings on ID-val, run the choices with every seed,
    then (only then) evaluate on ID test and OOD. Returns the JSON-able report."""
    cfg = cfg or ClassificationBenchmarkConfig()
    clock, cpu = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}
    torch_threads = torch.get_num_threads()

    source = make_source_data(cfg)
    target = make_target_data(cfg)
    backbone, pretraining = pretrain(cfg, source, log)
    seconds['data_and_pretraining'] = time.perf_counter() - clock

    # 1. Selection: ID train/val only. The OOD sets do not exist yet. It includes the final
    #    runs (the chosen settings with every seed), so there is no separate time for them.
    mark = time.perf_counter()
    chosen: dict[str, dict[str, Any]] = {}
    grids: dict[str, list[dict[str, Any]]] = {}
    grid_models: dict[str, dict[int, nn.Module]] = {}
    for method in sorted(cfg.methods, key=lambda m: m == 'lp-ft'):  # LP-FT after LP
        fixed = {'lp_lr': chosen['lp']['settings']['lr']} if method == 'lp-ft' else None
        if log is not None:
            log(f'selecting {method} on ID-val ...')
        chosen[method], grids[method], grid_models[method] = select_settings(
            cfg, method, backbone, target, fixed=fixed, log=log)
    seconds['selection'] = time.perf_counter() - mark

    # 2. Final runs at the chosen settings: the selection already trained them with every seed
    #    (the finalists' re-runs), so they are reused, not trained again.
    finals: list[tuple[str, int, dict[str, Any], nn.Module, dict[str, Any]]] = []
    for method in cfg.methods:
        settings = chosen[method]['settings']
        for seed, (model, record) in chosen[method]['runs'].items():
            record = {k: v for k, v in record.items()
                      if k in ('stages', 'train_seconds', 'bn_images')}
            finals.append((method, seed, settings, model, record))
            if log is not None:
                log(f'  final {method} seed {seed} ({record["train_seconds"]:.1f} s)')

    # 3. Evaluation on ID test and OOD, after every choice is fixed.
    mark = time.perf_counter()
    ood = ood_data(cfg)
    runs = []
    for method, seed, settings, model, record in finals:
        runs.append({'method': method, 'seed': seed, 'settings': settings,
                     'budget': stage_budget(cfg, method),
                     'accuracy': _evaluate_all(model, target, ood), **record})
    for method, records in grids.items():  # every search point, for (ID, OOD) curves
        for index, record in enumerate(records):
            record['accuracy'] = _evaluate_all(grid_models[method][index], target, ood)
    seconds['evaluation'] = time.perf_counter() - mark
    seconds['total'] = time.perf_counter() - clock
    seconds['cpu_total'] = time.process_time() - cpu  # wall time depends on the machine's load

    metrics = ['id_val', 'id_test'] + [f'ood_{n}' for n in ood] + ['ood_mean']
    summary = {method: {metric: _stat([r['accuracy'][metric] for r in runs
                                       if r['method'] == method]) for metric in metrics}
               for method in cfg.methods}
    return {
        'benchmark': 'classification',
        'config': asdict(cfg),
        'premise': {
            'source_task': pretraining['task'], 'source_classes': list(cfg.source_classes),
            'target_classes': list(cfg.target_classes),
            'fc': 'fresh for every method and seed: standard init (seeded) for FT, LP, LP-FT '
                  'and conversion-only; zero for the recipes that zero the predictors',
            'lp': 'head_scope modules only (with predictors: fc alone, a true linear probe)',
        },
        'pretraining': pretraining,
        'budget': {method: stage_budget(cfg, method) for method in cfg.methods},
        'selection': {
            'split': 'id_val', 'seed': cfg.seeds[0],
            'criterion': 'highest ID-val accuracy with the first seed, ties to the lower '
                         'ID-val loss; the top `finalists` points run with every seed and '
                         'the best mean wins (the same order on the means)',
            'note': 'OOD sets are generated after selection and final runs; the accuracies '
                    'stored with each grid point were measured afterwards, for curves only',
            'chosen': {m: {'settings': c['settings'], 'on_edge': c['on_edge'],
                           'widened': c['widened']} for m, c in chosen.items()},
            'grid': grids,
        },
        'runs': runs,
        'summary': summary,
        'seconds': seconds,
        'environment': {'torch': torch.__version__, 'threads': torch_threads},
    }


def _bn_images(report: Mapping[str, Any]) -> str:
    """How many images the conversions read (one pass over the training set each)."""
    counts = sorted({r['bn_images'] for r in report['runs'] if 'bn_images' in r})
    return '/'.join(str(c) for c in counts) or 'no'


def format_table(report: Mapping[str, Any]) -> str:
    """Markdown table: mean +- std over seeds of ID test and each OOD set, plus the choices."""
    summary = report['summary']
    metrics = [m for m in next(iter(summary.values())) if m != 'id_val']
    header = '| method | ' + ' | '.join(metrics) + ' | chosen (ID-val) |'
    lines = [header, '|' + '---|' * (len(metrics) + 2)]
    chosen = report['selection']['chosen']
    for method, row in summary.items():
        cells = [f'{100 * row[m]["mean"]:.1f} ± {100 * row[m]["std"]:.1f}' for m in metrics]
        settings = ', '.join(f'{k}={v:g}' for k, v in chosen[method]['settings'].items())
        edge = ' (edge)' if chosen[method]['on_edge'] else ''
        lines.append(f'| {method} | ' + ' | '.join(cells) + f' | {settings}{edge} |')
    config, budget = report['config'], report['budget']
    split = ' + '.join(str(s['iters']) for s in budget['lp-ft']['stages']) \
        if 'lp-ft' in budget else None
    lines.append('')
    lines.append(f'{len(config["seeds"])} seeds, {config["iters"]} iterations per method'
                 + (f' (LP-FT: {split})' if split else '') + ', accuracy in %, selection on '
                 f'ID-val only; BN statistics from {_bn_images(report)} training images; '
                 f'{report["seconds"]["total"]:.0f} s wall, '
                 f'{report["seconds"]["cpu_total"]:.0f} s CPU')
    return '\n'.join(lines)


def replace_config(cfg: ClassificationBenchmarkConfig, **changes: Any
                   ) -> ClassificationBenchmarkConfig:
    """``dataclasses.replace`` with list values turned into tuples (from a CLI or JSON)."""
    return replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                           for k, v in changes.items()})
