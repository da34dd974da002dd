"""The benchmark's pieces: selection on ID-val (grid, widening, finalists), equal budgets, Pareto
fronts, and the recipe options it searches (head scope, head/backbone ratio, the ablations) end to
end through the real Runner."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from daft_mm.benchmark.methods import COMPARED, Point, get_method, stage_budgets
from daft_mm.benchmark.report import pareto_front, summarize
from daft_mm.benchmark.selection import Axis, grid_search as _grid_search, one_at_a_time


# ------------------------------------------------------------------------------------ selection
def grid_search(score, axes, **kwargs):
    return _grid_search(one_at_a_time(score), axes, **kwargs)


def _bowl(best_lr: float, best_ratio: float = 100.0):
    """A score peaked at (best_lr, best_ratio) in log space, with a per-seed offset."""
    calls: List[Any] = []

    def score(p: Point, seed: int) -> float:
        calls.append((p, seed))
        d = math.log10(p.lr / best_lr) ** 2 + math.log10((p.ratio or best_ratio) / best_ratio) ** 2
        return 50.0 - 5.0 * d + 0.01 * seed
    return score, calls


def test_grid_search_widens_an_axis_whose_best_point_is_on_the_edge():
    score, calls = _bowl(best_lr=1e-4)  # far below the starting grid
    res = grid_search(score, [Axis('lr', (1e-2, 1e-1), step=10.0)], seeds=(0, ))
    assert res.chosen.lr == pytest.approx(1e-4)
    assert len(res.widened) == 3 and not res.on_edge  # 1e-3, 1e-4, then 1e-5 (worse)
    assert any(p.lr == pytest.approx(1e-5) for p, _ in calls)
    assert len(calls) == len(set(calls)) == 5  # no run twice


def test_grid_search_stops_widening_at_the_limit_and_says_so():
    score, _ = _bowl(best_lr=1e-9)
    # one value: both ways at once (0.1 worse, 1e-3 better), then down to 1e-4 and the limit
    res = grid_search(score, [Axis('lr', (1e-2, ), step=10.0)], seeds=(0, ), max_widen=3)
    assert res.chosen.lr == pytest.approx(1e-4) and res.on_edge == ['lr']


def test_finalists_get_every_seed_and_the_best_mean_wins():
    table = {0.1: [60.0, 40.0, 40.0], 0.3: [59.0, 58.0, 58.0], 1.0: [10.0, 10.0, 10.0]}
    res = grid_search(lambda p, s: table[p.lr][s], [Axis('lr', (0.1, 0.3, 1.0))], finalists=2)
    assert res.chosen.lr == 0.3  # seed 0 alone would pick 0.1
    assert res.finalists == [Point(lr=0.1), Point(lr=0.3)]
    assert set(res.scores[Point(lr=1.0)]) == {0}  # not a finalist: one seed only
    grid = res.to_dict()['grid']
    assert {g['lr'] for g in grid} == {0.1, 0.3, 1.0} and all('id_val' in g for g in grid)


def test_a_diverged_run_ranks_last():
    res = grid_search(lambda p, s: math.nan if p.lr == 1.0 else p.lr,
                      [Axis('lr', (0.1, 1.0))], seeds=(0, ), finalists=1)
    assert res.chosen.lr == 0.1


def test_categorical_axes_are_searched_but_never_widened():
    res = grid_search(lambda p, s: {'predictors': 1.0, 'new_modules': 2.0}[p.scope],
                      [Axis('lr', (0.1, )), Axis('scope', ('predictors', 'new_modules'))],
                      seeds=(0, ))
    assert res.chosen == Point(lr=0.1, scope='new_modules') and not res.widened


def test_an_axis_never_widens_below_its_floor():
    score, calls = _bowl(best_lr=0.1, best_ratio=1e-3)  # the best ratio lies below the floor
    res = grid_search(score, [Axis('lr', (0.1, )), Axis('ratio', (10.0, 100.0), step=10.0,
                                                          floor=1.0)], seeds=(0, ))
    assert sorted({p.ratio for p, _ in calls}) == [1.0, 10.0, 100.0]  # 1 is tried, 0.1 is not
    assert res.chosen.ratio == 1.0 and res.widened == ['ratio=1 (best was at the edge 10)']
    assert not res.on_edge  # at the floor: nothing left to try at that side
    # a step that would jump past the floor is not taken (nor clipped to it)
    score, calls = _bowl(best_lr=0.1, best_ratio=1e-3)
    res = grid_search(score, [Axis('lr', (0.1, )), Axis('ratio', (3.0, 30.0), step=10.0,
                                                          floor=1.0)], seeds=(0, ))
    assert {p.ratio for p, _ in calls} == {3.0, 30.0} and not res.widened and not res.on_edge
    # the upper side still widens; a one-value axis at its floor widens upwards only
    score, calls = _bowl(best_lr=0.1, best_ratio=1e4)
    res = grid_search(score, [Axis('lr', (0.1, )), Axis('ratio', (1.0, ), step=10.0, floor=1.0)],
                      seeds=(0, ), max_widen=2)
    assert sorted({p.ratio for p, _ in calls}) == [1.0, 10.0, 100.0]
    assert res.chosen.ratio == 100.0 and res.on_edge == ['ratio']
    with pytest.raises(ValueError, match='floor'):
        Axis('ratio', (0.5, 10.0), step=10.0, floor=1.0)


# ------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize('budget', [2, 3, 150, 301])
def test_every_method_gets_the_same_budget(budget):
    for spec in COMPARED:
        stages = stage_budgets(spec, budget)
        assert sum(stages.values()) == budget and min(stages.values()) >= 1
    assert len(stage_budgets(get_method('LP-FT'), budget)) == 2


def test_pareto_front_and_summary():
    pts = [(50, 30), (55, 28), (52, 31), (49, 29), (55, 28)]
    assert pareto_front(pts) == [(52, 31), (55, 28)]
    runs = [dict(id_val=1.0, id=10.0, ood={'a': 1.0}, ood_mean=1.0, cosine=0.5, cosine_pooled=1),
            dict(id_val=3.0, id=14.0, ood={'a': 3.0}, ood_mean=3.0, cosine=0.7, cosine_pooled=1)]
    s = summarize({'FT': runs}, ['a'])['FT']
    assert s['id_miou']['mean'] == 12.0 and s['id_miou']['std'] == pytest.approx(math.sqrt(8))
    assert summarize({'FT': runs[:1]}, ['a'])['FT']['id_val_miou']['std'] == 0.0


def test_front_lines_name_each_methods_pareto_settings():
    from daft_mm.benchmark.report import front_lines
    run = dict(method='FT', setting={'lr': 0.1}, id=50.0, ood_mean=30.0)
    runs = [run, dict(run, seed=1, id=52.0),  # one point, two seeds: (51, 30)
            dict(run, setting={'lr': 0.3}, id=48.0, ood_mean=33.0),  # on the front
            dict(run, setting={'lr': 1.0}, id=47.0, ood_mean=29.0),  # dominated
            dict(run, method='DAFT', setting={'lr': 0.01, 'ratio': 100.0, 'scope': 'predictors'})]
    assert front_lines(runs) == [
        'FT (3 settings searched): lr=0.1: 51.00 / 30.00; lr=0.3: 48.00 / 33.00',
        'DAFT (1 settings searched): lr=0.01 ratio=100 scope=predictors: 50.00 / 30.00']


# ------------------------------------------------------------- recipe options through the Runner
pytest.importorskip('mmseg')
import daft_mm  # noqa: E402,F401  (registers DAFTHook / DAFTModel)
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from _mm_helpers import CONFIGS, ProbeHook, load_tiny, shrink_config  # noqa: E402


class LrAndWeights(Hook):
    """Per step: each parameter's LR (by name) and, before the first step, the predictor and a BN
    layer's running mean."""
    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self.lrs: List[Dict[str, float]] = []
        self.before: Dict[str, Any] = {}

    def before_train(self, runner) -> None:
        net = runner.model.model
        self.before = dict(conv_seg=net.decode_head.conv_seg.weight.detach().clone(),
                           bn_mean=net.backbone.layer1[0].bn1.running_mean.detach().clone())

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        names = {id(p): n for n, p in runner.model.named_parameters()}
        # (the optimizer may hold parameters outside the model, e.g. a scalar of mmengine's)
        self.lrs.append({names[id(p)]: g['lr'] for g in runner.optim_wrapper.param_groups
                         for p in g['params'] if id(p) in names})


@pytest.fixture(scope='module')
def daft_cfg(tmp_path_factory) -> Path:
    return shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py',
                         tmp_path_factory.mktemp('bench_cfg'))


def _train(cfg_path: Path, tmp_path: Path, root: str, **options: Any):
    opts = {'train_cfg.max_iters': 3, 'train_dataloader.batch_size': 2}
    opts.update(options)
    cfg = load_tiny(cfg_path, tmp_path, root, **opts)
    runner = Runner.from_cfg(cfg)
    probe = LrAndWeights()
    runner.register_hook(probe)
    # the pretrained statistics: after the weights are loaded, before DAFTHook
    start = ProbeHook(lambda m: m.model.backbone.layer1[0].bn1.running_mean.detach().clone())
    runner.register_hook(start, priority='VERY_HIGH')
    runner.train()
    return runner, probe, start.records[0]


@pytest.mark.parametrize('scope', ['predictors', 'new_modules'])
def test_head_scope_and_ratio_hold_at_every_step(daft_cfg, cityscapes_root, tmp_path, scope):
    _, probe, _ = _train(daft_cfg, tmp_path, cityscapes_root, daft_head_lr_mult=50.0,
                         daft_head_modules=scope)
    assert probe.before['conv_seg'].abs().sum() == 0  # the predictor starts at zero
    assert len(probe.lrs) == 3
    assert probe.lrs[0]['model.backbone.layer1.0.conv1.weight'] > 0
    for lrs in probe.lrs:
        base = lrs['model.backbone.layer1.0.conv1.weight']
        if base == 0:  # PolyLR's end (eta_min=0): every group reaches 0 together
            assert set(lrs.values()) == {0.0}
            continue
        assert lrs['model.decode_head.conv_seg.weight'] == pytest.approx(50 * base)
        assert lrs['model.auxiliary_head.conv_seg.weight'] == pytest.approx(50 * base)
        inner = lrs['model.decode_head.bottleneck.conv.weight']
        assert inner == pytest.approx(50 * base if scope == 'new_modules' else base)
        assert all(v == pytest.approx(base) for k, v in lrs.items() if 'backbone' in k)


def test_head_modules_must_cover_the_predictors(daft_cfg, cityscapes_root, tmp_path):
    with pytest.raises(ValueError, match="daft_head_modules.*auxiliary_head.conv_seg"):
        _train(daft_cfg, tmp_path, cityscapes_root, daft_head_modules=['decode_head'])


def test_ablation_without_conversion_keeps_statistics_and_zeroes(daft_cfg, cityscapes_root,
                                                                   tmp_path):
    _, probe, bn_start = _train(daft_cfg, tmp_path, cityscapes_root,
                                **{'model.method': 'daft-no-convert'})
    assert torch.equal(probe.before['bn_mean'], bn_start)  # no conversion
    assert probe.before['conv_seg'].abs().sum() == 0
    lrs = probe.lrs[0]
    assert lrs['model.decode_head.conv_seg.weight'] > lrs['model.backbone.layer1.0.conv1.weight']


def test_ablation_conversion_only_converts_and_keeps_the_head(daft_cfg, cityscapes_root,
                                                               tmp_path):
    _, probe, bn_start = _train(daft_cfg, tmp_path, cityscapes_root,
                                **{'model.method': 'daft-convert-only'})
    assert not torch.equal(probe.before['bn_mean'], bn_start)  # converted
    assert probe.before['conv_seg'].abs().sum() > 0  # standard init kept
    assert len({round(v, 12) for v in probe.lrs[0].values()}) == 1  # one LR for everything


def test_block_bootstrap_pairs_seeds_and_resamples_blocks_of_images():
    """The headline's paired differences: a method better on every image has an interval above
    zero; the same predictions give exactly zero; mIoU from the counts skips absent classes."""
    import numpy as np

    from daft_mm.benchmark.report import block_bootstrap, counts_miou, per_class_iou
    rng = np.random.default_rng(0)
    union = rng.integers(50, 100, size=(40, 3))
    union[:, 2] = 0  # a class no image has: skipped, not a zero
    good = (union * 0.8).astype(int)
    worse = (union * 0.6).astype(int)
    assert counts_miou(good, union) == pytest.approx(80.0, abs=1.0)  # counts are whole pixels

    def run(seed, inter):
        return dict(seed=seed, counts={'dusk': dict(intersect=inter.tolist(),
                                                    union=union.tolist())})

    results = {'FT': [run(s, worse) for s in range(3)],
               'copy': [run(s, worse) for s in range(3)],
               'DAFT': [run(s, good) for s in range(3)]}
    boot = block_bootstrap(results, 'dusk', samples=200)
    assert boot['DAFT']['low'] > 0 and boot['DAFT']['higher'] == 3
    assert boot['DAFT']['mean'] == pytest.approx(20.0, abs=1.0)
    assert boot['copy']['low'] == boot['copy']['high'] == 0.0
    # a row's interval is the same whatever other rows the report has
    alone = block_bootstrap({k: results[k] for k in ('FT', 'DAFT')}, 'dusk', samples=200)
    assert alone['DAFT'] == boot['DAFT']
    one = block_bootstrap({k: v[:1] for k, v in results.items()}, 'dusk', samples=50)
    assert one['DAFT']['low'] is None  # one seed: no interval
    classes = per_class_iou(results['DAFT'], 'dusk', ['road', 'car', 'sign'])
    assert classes['sign'] is None and classes['road'] == pytest.approx(80.0, abs=1.0)
