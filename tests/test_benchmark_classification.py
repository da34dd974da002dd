"""daft_mm.benchmark.classification and the classification head/ratio options, with real training
on tiny generated data: fresh heads, the LR each group gets at every step, the head scope, equal
budgets, selection on ID-val only, and the benchmark end to end (Python and tools/train_cls.py)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import daft_mm.benchmark.classification as bench
from daft_mm.benchmark.classification import (METHODS, Split, fresh_model, make_ood_data,
                                              make_target_data, quick_config,
                                              run_classification_benchmark, stage_budget,
                                              train_one)
from daft_mm.benchmark.methods import Point
from daft_mm.classification import build_resnet, finetune, head_modules
from daft_mm.core import get_recipe

REPO = Path(__file__).resolve().parents[1]
ZERO_INIT = {m for m in METHODS if any(s.zero_init_head for s in get_recipe(m).stages)}


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def setup():
    """A quick config, a 'pretrained' backbone with a 6-class source fc, and ID target data."""
    cfg = quick_config()
    torch.manual_seed(123)
    source = build_resnet(cfg.arch, len(cfg.source_classes), base_width=cfg.width,
                          small_input=True)
    with torch.no_grad():  # make the source fc recognisable: never all-zero, never random-like
        source.fc.weight.fill_(0.5)
        source.fc.bias.fill_(0.25)
    backbone = {k: v.clone() for k, v in source.state_dict().items()}
    return cfg, backbone, make_target_data(cfg)


class Recorder:
    """``on_step`` hook: what each step saw before its optimizer update."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def __call__(self, info) -> None:
        groups = {g['name']: g for g in info.optimizer.param_groups}
        self.steps.append({
            'stage': info.stage, 'step': info.step,
            'lrs': {name: g['lr'] for name, g in groups.items()},
            'params': {name: {id(p) for p in g['params']} for name, g in groups.items()},
            'fc': (info.model.fc.weight.detach().clone(), info.model.fc.bias.detach().clone()),
            'conv1': info.model.conv1.weight.detach().clone(),
        })


# ------------------------------------------------------------------ fresh heads
@pytest.mark.parametrize('method', METHODS)
def test_every_method_starts_from_a_fresh_fc_and_the_pretrained_backbone(setup, method):
    cfg, backbone, target = setup
    recorder = Recorder()
    train_one(cfg, method, {'lr': 0.01, 'lp_lr': 0.05}, 7, backbone, target['train'],
              on_step=recorder)
    weight, bias = recorder.steps[0]['fc']  # before the first update
    assert weight.shape == (len(cfg.target_classes), recorder.steps[0]['conv1'].shape[0] * 8)
    assert torch.equal(recorder.steps[0]['conv1'], backbone['conv1.weight'])
    assert not torch.equal(weight, backbone['fc.weight'][:len(cfg.target_classes)])
    if method in ZERO_INIT:
        assert not weight.any() and not bias.any()
    else:  # standard init drawn from the run's seed, not the checkpoint's fc
        expected = fresh_model(cfg, backbone, 7).fc
        assert weight.any() and (weight != 0.5).all()
        assert torch.equal(weight, expected.weight) and torch.equal(bias, expected.bias)
        assert not torch.equal(weight, fresh_model(cfg, backbone, 8).fc.weight)


# ------------------------------------------------------------------ LRs at every step
def _cosine(lr: float, step: int, total: int) -> float:
    return lr * (1 + math.cos(math.pi * (step - 1) / total)) / 2


@pytest.mark.parametrize('method,ratio', [('daft', 100.0), ('daft-no-convert', 1000.0),
                                          ('ft', None), ('daft-convert-only', None)])
def test_head_group_runs_at_lr_times_ratio_at_every_step(setup, method, ratio):
    cfg, backbone, target = setup
    recorder = Recorder()
    settings = {'lr': 0.02} if ratio is None else {'lr': 0.02, 'head_lr_mult': ratio}
    model, _ = train_one(cfg, method, settings, 0, backbone, target['train'], on_step=recorder)
    fc_ids = {id(p) for p in model.fc.parameters()}
    expected_ratio = 1.0 if ratio is None else ratio
    assert len(recorder.steps) == cfg.iters
    for seen in recorder.steps:
        base = _cosine(0.02, seen['step'], cfg.iters)
        assert seen['lrs']['feature_extractor'] == pytest.approx(base, rel=1e-6, abs=1e-12)
        assert seen['lrs']['head'] == pytest.approx(base * expected_ratio, rel=1e-6, abs=1e-12)
        assert seen['params']['head'] == fc_ids
        assert not seen['params']['feature_extractor'] & fc_ids


def test_lp_ft_probes_at_its_own_lr_then_fine_tunes_everything(setup):
    cfg, backbone, target = setup
    recorder = Recorder()
    model, record = train_one(cfg, 'lp-ft', {'lr': 0.01, 'lp_lr': 0.2}, 0, backbone,
                              target['train'], on_step=recorder)
    lp = [s for s in recorder.steps if s['stage'] == 'lp']
    ft = [s for s in recorder.steps if s['stage'] == 'ft']
    fc_ids = {id(p) for p in model.fc.parameters()}
    for seen in lp:  # a true linear probe: fc alone, at the probe LR
        assert set(seen['lrs']) == {'head'} and seen['params']['head'] == fc_ids
        assert seen['lrs']['head'] == pytest.approx(_cosine(0.2, seen['step'], len(lp)))
    for seen in ft:
        assert seen['lrs']['head'] == seen['lrs']['feature_extractor'] == pytest.approx(
            _cosine(0.01, seen['step'], len(ft)))
    assert not torch.equal(ft[0]['fc'][0], model.fc.weight)  # FT moved the probed fc
    assert not torch.equal(lp[0]['fc'][0], ft[0]['fc'][0])  # FT starts from the probed fc
    assert [s['trainable_params'] for s in record['stages']] == [
        sum(p.numel() for p in model.fc.parameters()),
        sum(p.numel() for p in model.parameters())]


# ------------------------------------------------------------------ head scope
class NeckNet(nn.Module):
    """A pretrained backbone plus two new modules: a hidden layer and the predictor."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.neck = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.neck(self.backbone(x)))


def _colour_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    images = torch.randn(24, 3, 6, 6, generator=gen)
    images[torch.arange(24), labels] += 2.0
    return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True, generator=gen)


@pytest.mark.parametrize('scope,head', [('predictors', ['fc']), ('new_modules', ['neck', 'fc'])])
def test_head_scope_decides_the_head_group_and_zero_init_stays_on_fc(scope, head):
    torch.manual_seed(0)
    model = NeckNet()
    neck_before = model.neck[0].weight.detach().clone()
    head_ids = {id(p) for name in head for p in model.get_submodule(name).parameters()}
    seen = []

    def check(info):
        groups = {g['name']: g for g in info.optimizer.param_groups}
        seen.append(info.step)
        assert {id(p) for p in groups['head']['params']} == head_ids
        assert groups['head']['lr'] == pytest.approx(50 * groups['feature_extractor']['lr'])
        if info.step == 1:  # only the final predictor is zeroed
            assert not info.model.fc.weight.any()
            assert torch.equal(info.model.neck[0].weight, neck_before)

    run = finetune(model, _colour_loader(), method='daft', iters=3, lr=0.01, head_lr_mult=50,
                   head_scope=scope, on_step=check)
    assert seen == [1, 2, 3]
    assert run.stages[0].head_modules == head and run.stages[0].head_scope == scope


def test_lp_under_new_modules_trains_the_whole_new_head():
    torch.manual_seed(0)
    model = NeckNet()
    run = finetune(model, _colour_loader(), method='lp', iters=2, lr=0.05,
                   head_scope='new_modules')
    expected = sum(p.numel() for m in (model.neck, model.fc) for p in m.parameters())
    assert run.stages[0].trainable_params == expected


def test_new_modules_of_a_resnet_is_its_fc_and_pretrained_can_be_named():
    model = build_resnet('resnet10', 3, base_width=4, small_input=True)
    assert head_modules(model, ['fc'], 'new_modules') == ['fc']
    pretrained = [n for n, _ in model.named_children() if n not in ('fc', 'layer4')]
    assert head_modules(model, ['fc'], 'new_modules', pretrained) == ['layer4', 'fc']
    with pytest.raises(ValueError, match='head_scope'):
        head_modules(model, ['fc'], 'everything')


# ------------------------------------------------------------------ budgets
def test_every_method_spends_the_same_budget(setup):
    cfg, backbone, target = setup
    cfg = quick_config(iters=9, lp_fraction=1 / 3)
    for method in METHODS:
        budget = stage_budget(cfg, method)
        assert budget['total_iters'] == sum(s['iters'] for s in budget['stages']) == 9
        recorder = Recorder()
        _, record = train_one(cfg, method, {'lr': 0.01}, 0, backbone, target['train'],
                              on_step=recorder)
        assert len(recorder.steps) == 9, method  # optimizer steps actually taken
        assert [s['iters'] for s in record['stages']] == [s['iters'] for s in budget['stages']]
    assert [s['iters'] for s in stage_budget(cfg, 'lp-ft')['stages']] == [3, 6]


# ------------------------------------------------------------------ selection and end to end
def test_selection_never_sees_ood_and_ignores_it(monkeypatch):
    cfg = quick_config(iters=4, pretrain_iters=4, seeds=(0,), methods=('ft', 'lp', 'lp-ft', 'daft'))
    lines: list[str] = []
    calls: list[int] = []

    def ood_spy(config):
        calls.append(len(lines))
        return make_ood_data(config)

    # Any direct use of the module's OOD generator is seen too, not only the injected one.
    monkeypatch.setattr(bench, 'make_ood_data', ood_spy)

    def scrambled_ood(config):  # other images and labels entirely
        data = make_ood_data(quick_config(data_seed=9))
        return {name: Split(split.images, split.labels.roll(1)) for name, split in data.items()}

    first = run_classification_benchmark(cfg, log=lines.append, ood_data=ood_spy)
    assert len(calls) == 1
    assert not any('select' in line or 'final' in line for line in lines[calls[0]:])
    second = run_classification_benchmark(cfg, log=None, ood_data=scrambled_ood)
    assert first['selection']['chosen'] == second['selection']['chosen']
    for method in cfg.methods:
        assert ([p['id_val'] for p in first['selection']['grid'][method]]
                == [p['id_val'] for p in second['selection']['grid'][method]])
    assert [r['accuracy']['id_test'] for r in first['runs']] == [
        r['accuracy']['id_test'] for r in second['runs']]
    assert ([r['accuracy']['ood_mean'] for r in first['runs']]
            != [r['accuracy']['ood_mean'] for r in second['runs']])  # the OOD change was real


def test_train_cls_benchmark_end_to_end(tmp_path):
    out = tmp_path / 'bench.json'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train_cls.py'), '--benchmark', '--quick',
         '--set', 'seeds=[0,1,2]', '--set', 'lr_grid=[0.01,0.1]', '--set', 'widen=1',
         '--head-scope', 'new_modules', '--out', str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert '| daft-convert-only |' in proc.stdout and 'ood_mean' in proc.stdout
    assert report['config']['head_scope'] == 'new_modules'
    assert list(report['summary']) == list(METHODS)
    for method in METHODS:
        runs = [r for r in report['runs'] if r['method'] == method]
        assert sorted(r['seed'] for r in runs) == [0, 1, 2]
        assert report['summary'][method]['ood_mean']['n'] == 3
        assert report['budget'][method]['total_iters'] == report['config']['iters']
        assert {r['budget']['total_iters'] for r in runs} == {report['config']['iters']}
        assert all(r['settings'] == report['selection']['chosen'][method]['settings']
                   for r in runs)
        grid = report['selection']['grid'][method]
        assert sum(p['chosen'] for p in grid) == 1
        best = max(grid, key=lambda p: (p['id_val'], -p['id_val_loss']))
        assert best['chosen'] and best['settings'] == runs[0]['settings']
        assert all(0 <= p['id_val'] <= 1 and 'ood_mean' in p['accuracy'] for p in grid)
        assert all(r['stages'][-1]['head_modules'] == ['fc'] for r in runs)
        # every conversion read the whole training set once (the training loader drops the
        # last incomplete batch; the statistics pass does not)
        converts = any(s.convert_bn for s in get_recipe(method).stages)
        train_images = len(report['config']['target_classes']) * report['config'][
            'train_per_class']  # one style, 'id'
        assert all(r.get('bn_images') == (train_images if converts else None) for r in runs)
    # lr 0.1 is a grid end; with widen=1 a best point there adds 0.1 * 0.1 / 0.01 = 1.0
    ft_grid = report['selection']['grid']['ft']
    if next(p for p in ft_grid if p['chosen'])['settings']['lr'] in (0.01, 0.1):
        assert any(p['widened'] for p in ft_grid)
    assert report['selection']['chosen']['lp-ft']['settings']['lp_lr'] == (
        report['selection']['chosen']['lp']['settings']['lr'])
    assert f'BN statistics from {train_images} training images' in proc.stdout


def test_search_axes_step_by_the_grid_spacing_and_the_ratio_not_below_one():
    cfg = quick_config(lr_grid=(0.003, 0.01, 0.03, 0.1), lp_lr_grid=(0.1,),
                       ratio_grid=(10.0, 100.0, 1000.0))
    lr, ratio = bench.search_axes(cfg, 'daft')
    assert (lr.name, lr.values, lr.floor) == ('lr', cfg.lr_grid, None)
    assert lr.step == pytest.approx(0.1 / 0.03)  # the spacing of the two largest values
    assert (ratio.name, ratio.step, ratio.floor) == ('ratio', 10.0, 1.0)
    (lp,) = bench.search_axes(cfg, 'lp')
    assert lp.values == (0.1,) and lp.step is None  # one value: nothing says how far to step
    assert [a.name for a in bench.search_axes(cfg, 'ft')] == ['lr']
    assert bench.point_settings(Point(lr=0.01, ratio=100.0), {'lp_lr': 0.3}) == {
        'lp_lr': 0.3, 'lr': 0.01, 'head_lr_mult': 100.0}


def test_selection_score_is_accuracy_with_ties_to_the_lower_loss():
    score = bench.selection_score
    assert score(0.9, 0.2) > score(0.9, 0.3) > score(0.9, math.inf)
    assert score(0.9, math.inf) > score(0.9 - 1 / 60, 0.0)  # one image of 60 outweighs any loss
    assert score(0.5, 0.1) == pytest.approx(0.5, abs=1e-6)


class _Fake(nn.Module):
    def __init__(self, settings, seed):
        super().__init__()
        self.key = (settings['lr'], settings.get('head_lr_mult'), seed)


def test_select_settings_widens_down_to_ratio_one_breaks_ties_by_loss_and_reuses_finalists(
        monkeypatch):
    """select_settings through grid_search with a made-up ID-val (no training): the ratio grid
    widens from 10 to 1 and no lower, equal accuracies go to the lower loss, the finalists run
    with every seed, the best mean wins and its runs are the final runs (nothing trained twice)."""
    trained = []

    def fake_train(cfg, method, settings, seed, backbone, train, on_step=None):
        trained.append((settings['lr'], settings['head_lr_mult'], seed))
        return _Fake(settings, seed), {'stages': [], 'train_seconds': 0.0}

    def fake_score(model, split):
        lr, ratio, seed = model.key
        accuracy = {0.01: 0.8, 0.1: 0.8}.get(lr, 0.5) - 0.1 * math.log10(ratio)  # best: ratio 1
        if lr == 0.1 and seed > 0:
            accuracy -= 0.2  # lr 0.1 ranks first with seed 0 only
        return accuracy, {0.01: 0.5, 0.1: 0.4}.get(lr, 1.0)  # equal accuracy: lr 0.1 (loss)

    monkeypatch.setattr(bench, 'train_one', fake_train)
    monkeypatch.setattr(bench, '_score', fake_score)
    cfg = quick_config(lr_grid=(0.01, 0.1), ratio_grid=(10.0, 100.0), widen=3, finalists=3,
                       seeds=(0, 1, 2))
    target = {'train': None, 'val': None}
    chosen, grid, models = bench.select_settings(cfg, 'daft', {}, target)
    ratios = sorted({p['settings']['head_lr_mult'] for p in grid})
    assert ratios == [1.0, 10.0, 100.0]  # widened to 1, not to 0.1
    assert [p['widened'] for p in grid] == [p['settings']['head_lr_mult'] == 1.0
                                            or p['settings']['lr'] == 1.0 for p in grid]
    assert len(grid) == 6  # 2 x 2, lr 1 (worse) and ratio 1 (better) on the best point's lines
    # the ratio is at its floor (nothing left to try), but the choice after the finalists,
    # lr 0.01, is the lr grid's lower edge: said, not hidden
    assert chosen['on_edge'] is True
    first = max(grid, key=lambda p: (p['id_val'], -p['id_val_loss']))
    assert first['settings'] == {'lr': 0.1, 'head_lr_mult': 1.0} and first['finalist']
    # finalists by seed 0: (0.1, 1), then (0.1, 10) before (0.01, 10) by loss; best mean:
    assert chosen['settings'] == {'lr': 0.01, 'head_lr_mult': 10.0}
    assert [p['chosen'] for p in grid].count(True) == 1
    assert sorted(chosen['runs']) == [0, 1, 2]
    assert all(models[i].key[2] == 0 for i in models) and len(models) == len(grid)
    assert len(trained) == len(set(trained)) == len(grid) + 2 * cfg.finalists
    assert {p['seed'] for p in grid} == {0}
    assert sum('id_val_by_seed' in p for p in grid) == sum(p['finalist'] for p in grid) == 3


def test_train_cls_runs_the_ablations_with_head_scope_and_named_pretrained_modules(tmp_path):
    from _tools import load_tool
    tool = load_tool('train_cls')  # its command line, in-process
    from daft_mm.classification import generate_demo_datasets
    data = generate_demo_datasets(tmp_path / 'demo', train_per_class=4, test_per_class=2,
                                  image_size=12)
    summary = tool.main([
        '--train', str(data['train']), '--test', str(data['test']),
        '--ood', f'noise={data["ood_noise"]}', '--method', 'daft-no-convert',
        'daft-convert-only', 'lp-ft', '--arch', 'resnet10', '--width', '4', '--small-input',
        '--image-size', '12', '--batch-size', '6', '--iters', '2', '--lp-iters', '1',
        '--lr', '0.01', '--lp-lr', '0.3', '--head-lr-mult', '20', '--head-scope', 'new_modules',
        '--pretrained', 'conv1', 'bn1', 'layer1', 'layer2', 'layer3'])
    results = summary['results']
    for method in ('daft-no-convert', 'daft-convert-only'):
        (stage,) = results[method]['stages']
        assert stage['head_modules'] == ['layer4', 'fc'] and stage['head_scope'] == 'new_modules'
        assert stage['head_lr'] == pytest.approx(20 * stage['lr'])
    assert results['daft-no-convert']['bn_conversion'] is None
    assert results['daft-convert-only']['bn_conversion']['layers']
    lp, ft = results['lp-ft']['stages']
    assert (lp['lr'], ft['lr']) == (0.3, 0.01)
    with pytest.raises(SystemExit):
        tool.parse_args(['--train', 'a', '--test', 'b', '--quick'])  # --quick needs --benchmark
