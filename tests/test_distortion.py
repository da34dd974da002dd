"""Feature distortion: core functions, the analysis tool (as a subprocess), the DistortionHook in a
real mmengine Runner. Everything runs on a tiny DeepLabV3 and a generated Cityscapes-layout set."""
from __future__ import annotations

import glob
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
from collections import OrderedDict

import pytest

from _tools import load_tool
import torch
from torch import nn

from daft_mm.core.distortion import feature_similarity, pairwise_cosine, relative_change

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_CFG = osp.join(REPO, 'configs', '_tiny_', 'tiny_deeplabv3_cityscapes.py')


# ------------------------------------------------------------------------------ core: features
def test_identical_features_give_cosine_one_and_distance_zero():
    f = torch.randn(3, 8, 5, 6)
    f[0, :, 0, 0] = 0  # an all-zero pixel, identical in both: counts as identical
    sim = feature_similarity(f, f.clone())
    assert torch.equal(sim.cosine, torch.ones(3, dtype=torch.float64))
    assert torch.equal(sim.l2, torch.zeros(3, dtype=torch.float64))
    assert sim.pixel_cosine.shape == (3, 5, 6)
    assert torch.equal(sim.pixel_cosine, torch.ones(3, 5, 6, dtype=torch.float64))


def test_feature_similarity_known_values():
    f0 = torch.rand(2, 4, 3, 3) + 0.1
    opposite = feature_similarity(f0, -f0)
    assert torch.allclose(opposite.cosine, -torch.ones(2, dtype=torch.float64))
    scaled = feature_similarity(f0, 2 * f0)
    pooled = f0.double().mean(dim=(2, 3))
    assert torch.allclose(scaled.cosine, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(scaled.l2, pooled.norm(dim=1))
    # one pixel orthogonal: only that pixel's cosine drops, to exactly 0
    f1 = f0.clone()
    f1[1, :, 2, 1] = torch.tensor([f0[1, 1, 2, 1], -f0[1, 0, 2, 1], 0, 0])
    f0[1, 2:, 2, 1] = 0
    f1[1, 2:, 2, 1] = 0
    pix = feature_similarity(f0, f1).pixel_cosine
    assert pix[1, 2, 1].abs().item() < 1e-12
    mask = torch.ones_like(pix, dtype=torch.bool)
    mask[1, 2, 1] = False
    assert torch.allclose(pix[mask], torch.ones(int(mask.sum()), dtype=torch.float64))


def test_pooled_features_and_zero_vector_rules():
    f0 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    f1 = torch.tensor([[0.0, 3.0], [0.0, 0.0], [1.0, 1.0]])
    sim = feature_similarity(f0, f1)
    assert sim.pixel_cosine is None
    assert sim.cosine.tolist() == [0.0, 1.0, 0.0]  # orthogonal; both zero; one zero
    want = torch.tensor([math.sqrt(10), 0.0, math.sqrt(2)], dtype=torch.float64)
    assert torch.allclose(sim.l2, want)
    assert pairwise_cosine(torch.zeros(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]


def test_feature_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match='shapes differ'):
        feature_similarity(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 2))
    with pytest.raises(ValueError, match=r'\(N, C\)'):
        feature_similarity(torch.zeros(4), torch.zeros(4))


# ---------------------------------------------------------------------------- core: parameters
def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, bias=False), nn.BatchNorm2d(cout))


class TinyResNetish(nn.Module):
    """ResNet naming (stem, layer1.., fc) without mmseg: enough for the pure functions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(_conv_bn(4, 4))
        self.layer2 = nn.Sequential(_conv_bn(4, 8), _conv_bn(8, 8))
        self.fc = nn.Linear(8, 2)


def _randomised_state(seed: int = 0) -> OrderedDict:
    torch.manual_seed(seed)
    model = TinyResNetish()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.uniform_(0.5, 1.5)
            m.running_var.uniform_(0.5, 2.0)
    return OrderedDict((k, v.clone()) for k, v in model.state_dict().items())


def test_identical_states_give_zero_change_in_network_order():
    s0 = _randomised_state()
    report = relative_change(s0, OrderedDict((k, v.clone()) for k, v in s0.items()))
    assert all(row.relative == 0.0 and row.abs_change == 0.0 for row in report.layers)
    assert report.stages == ['stem', 'layer1', 'layer2']
    assert [row.name for row in report.rows('conv_weight')] == [
        'conv1', 'layer1.0.0', 'layer2.0.0', 'layer2.1.0']
    assert [row.stage for row in report.rows('bn_running_var')] == [
        'stem', 'layer1', 'layer2', 'layer2']
    assert report.quantities() == ['conv_weight', 'bn_weight', 'bn_bias', 'bn_running_mean',
                                   'bn_running_var']
    assert not any(row.name == 'fc' for row in report.layers)  # 2-D linear weight: not a conv
    indices = [row.index for row in report.layers]
    assert indices == sorted(indices)


@pytest.mark.parametrize('key,quantity', [('layer2.0.0.weight', 'conv_weight'),
                                          ('layer1.0.1.running_var', 'bn_running_var'),
                                          ('bn1.bias', 'bn_bias')])
def test_a_perturbed_tensor_shows_up_in_exactly_that_layer(key, quantity):
    s0 = _randomised_state()
    s1 = OrderedDict((k, v.clone()) for k, v in s0.items())
    s1[key] = s1[key] * 1.25
    report = relative_change(s0, s1)
    moved = [row for row in report.layers if row.abs_change > 0]
    assert len(moved) == 1
    row = moved[0]
    assert f'{row.name}.' + key.rsplit('.', 1)[1] == key and row.quantity == quantity
    assert row.relative == pytest.approx(0.25, rel=1e-6)  # float32 rounding of x1.25
    assert row.abs_change == pytest.approx(0.25 * s0[key].double().norm().item(), rel=1e-6)
    stage = row.stage
    for q, per_stage in report.stage_means().items():
        for s, value in per_stage.items():
            expected = 0.25 / len([r for r in report.rows(q) if r.stage == s]) \
                if (q, s) == (quantity, stage) else 0.0
            assert value == pytest.approx(expected, rel=1e-6)


def test_zero_reference_is_flagged_not_divided():
    s0 = _randomised_state()
    s0['layer1.0.1.bias'].zero_()  # zero bias that moves
    s0['layer2.1.1.bias'].zero_()  # zero bias that stays
    s1 = OrderedDict((k, v.clone()) for k, v in s0.items())
    s1['layer1.0.1.bias'] += 0.5
    report = relative_change(s0, s1)
    rows = {(r.name, r.quantity): r for r in report.layers}
    moved, still = rows[('layer1.0.1', 'bn_bias')], rows[('layer2.1.1', 'bn_bias')]
    assert moved.zero_reference and math.isnan(moved.relative)
    assert moved.abs_change == pytest.approx(0.5 * 2)  # 4 channels of 0.5
    assert still.zero_reference and still.relative == 0.0
    assert report.skipped_in_means() == ['layer1.0.1:bn_bias']
    assert report.quantity_means()['bn_bias'] == 0.0  # NaN row skipped, not propagated
    assert math.isnan(report.stage_means()['bn_bias']['layer1'])  # nothing left to average


def test_prefix_and_architecture_mismatch_errors():
    s0 = _randomised_state()
    whole = OrderedDict((f'backbone.{k}', v) for k, v in s0.items())
    whole['decode_head.conv_seg.weight'] = torch.ones(2, 8, 1, 1)
    report = relative_change(whole, whole, prefix='backbone.')
    assert not any(r.name.startswith('decode_head') for r in report.layers)
    with pytest.raises(ValueError, match="prefix 'neck.'"):
        relative_change(whole, whole, prefix='neck.')
    s1 = OrderedDict((k, v) for k, v in s0.items() if k != 'layer2.1.0.weight')
    with pytest.raises(KeyError, match='layer2.1.0.weight'):
        relative_change(s0, s1)
    s1 = OrderedDict(s0)
    s1['layer1.0.0.weight'] = torch.zeros(4, 4, 1, 1)
    with pytest.raises(ValueError, match='different architectures'):
        relative_change(s0, s1)


# ----------------------------------------------------------------------- mm: tool and hook
mmengine = pytest.importorskip('mmengine')
pytest.importorskip('mmseg')


@pytest.fixture(scope='module')
def tiny_cfg_path(cityscapes_root, tmp_path_factory) -> str:
    """The tiny DeepLabV3 Cityscapes config pointed at the session's generated data (conftest)."""
    path = tmp_path_factory.mktemp('cfg') / 'tiny_distortion.py'
    path.write_text(
        f"_base_ = [{TINY_CFG!r}]\n"
        f"train_dataloader = dict(dataset=dict(data_root={cityscapes_root!r}))\n"
        f"val_dataloader = dict(dataset=dict(data_root={cityscapes_root!r}))\n"
        f"test_dataloader = dict(dataset=dict(data_root={cityscapes_root!r}))\n")
    return str(path)


def _build_tiny_model(cfg_path: str) -> nn.Module:
    import daft_mm  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(cfg_path)
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    # Non-trivial BN statistics, so that conversion visibly moves them.
    for m in model.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model


_FEATURE_LINE = re.compile(r"^  features out(\d+): mean cosine (\S+), mean L2 (\S+), "
                           r"mean pixel cosine (\S+)$")
_RUN_LINE = re.compile(r"^run '(\w+)' vs '(\w+)' \(")


def test_tool_writes_figures_and_json_matching_the_summary(tiny_cfg_path, tmp_path):
    model = _build_tiny_model(tiny_cfg_path)
    full = model.state_dict()
    # The pretrained checkpoint as a bare backbone (like an ImageNet checkpoint, plus a classifier
    # the tool must ignore); the fine-tuned ones as whole-model mmengine checkpoints.
    bare = {k[len('backbone.'):]: v for k, v in full.items() if k.startswith('backbone.')}
    bare['fc.weight'] = torch.zeros(10, 128)
    torch.save({'state_dict': bare}, tmp_path / 'pretrained.pth')
    torch.save({'state_dict': full, 'meta': {}}, tmp_path / 'same.pth')
    perturbed = {k: v.clone() for k, v in full.items()}
    perturbed['backbone.layer3.0.conv1.weight'] *= 1.2
    torch.save({'state_dict': perturbed}, tmp_path / 'perturbed.pth')

    out_dir = tmp_path / 'out'
    cmd = [sys.executable, osp.join(REPO, 'tools', 'analyze_distortion.py'), tiny_cfg_path,
           '--pretrained', str(tmp_path / 'pretrained.pth'),
           '--finetuned', f'same={tmp_path / "same.pth"}',
           f'perturbed={tmp_path / "perturbed.pth"}',
           '--convert', 'perturbed', '--convert-batches', '1', '--max-images', '2',
           '--device', 'cpu', '--out-dir', str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ('distortion.json', 'feature_similarity.png', 'parameter_change.png'):
        assert (out_dir / name).stat().st_size > 0, name
    result = json.loads((out_dir / 'distortion.json').read_text())
    assert result['num_images'] == 2 and result['feature_levels'] == [3]
    # issue 22 item 8: the user's umask, not mkstemp's 0600; another analysis is not written over
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out_dir / 'distortion.json').stat().st_mode & 0o777 == 0o666 & ~mask
    other = cmd[:cmd.index('--finetuned') + 2] + ['--max-images', '1', '--device', 'cpu',
                                                   '--out-dir', str(out_dir)]
    refused = subprocess.run(other, capture_output=True, text=True, cwd=REPO, timeout=300,
                             env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1'))
    assert refused.returncode != 0 and 'holds an analysis of other inputs' in refused.stderr
    assert '--overwrite' in refused.stderr
    assert json.loads((out_dir / 'distortion.json').read_text()) == result

    same = result['runs']['same']['comparisons']
    assert list(same) == ['pretrained']
    feats = same['pretrained']['features']['3']
    assert feats['per_image']['cosine'] == [1.0, 1.0] and feats['per_image']['l2'] == [0.0, 0.0]
    assert feats['mean']['pixel_cosine'] == 1.0
    assert all(row['relative'] == 0.0 for row in same['pretrained']['parameters']['layers'])

    pert = result['runs']['perturbed']['comparisons']
    assert set(pert) == {'pretrained', 'converted'}
    moved = [r for r in pert['pretrained']['parameters']['layers'] if r['abs_change'] > 0]
    assert [(r['name'], r['quantity'], r['stage']) for r in moved] == [
        ('layer3.0.conv1', 'conv_weight', 'layer3')]
    assert moved[0]['relative'] == pytest.approx(0.2, rel=1e-6)
    assert pert['pretrained']['features']['3']['mean']['cosine'] < 1.0
    # Against the converted model: the same conv change, but BN statistics differ (the run never
    # saw conversion, so its BN stats are the pretrained ones).
    conv = {(r['name'], r['quantity']): r for r in pert['converted']['parameters']['layers']}
    assert conv[('layer3.0.conv1', 'conv_weight')]['relative'] == pytest.approx(0.2, rel=1e-6)
    assert pert['converted']['parameters']['quantity_means']['bn_running_var'] > 0
    assert 'converted here with convert_bn' in pert['converted']['reference_checkpoint']

    # Every printed feature mean equals the JSON number (printed with 6 significant digits).
    printed, current = {}, None
    for line in proc.stdout.splitlines():
        if (m := _RUN_LINE.match(line)):
            current = m.groups()
        elif (m := _FEATURE_LINE.match(line)):
            printed[current] = [float(x) for x in m.groups()[1:]]
    assert set(printed) == {('same', 'pretrained'), ('perturbed', 'pretrained'),
                            ('perturbed', 'converted')}
    for (run, ref), values in printed.items():
        mean = result['runs'][run]['comparisons'][ref]['features']['3']['mean']
        for got, want in zip(values, (mean['cosine'], mean['l2'], mean['pixel_cosine'])):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-12)
    # ... and so do the per-quantity means of the parameter table ('all' column).
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith('  conv_weight ')]
    assert len(rows) == 3
    assert float(rows[1].split()[-1]) == pytest.approx(
        result['runs']['perturbed']['comparisons']['pretrained']['parameters']
        ['quantity_means']['conv_weight'], rel=1e-5)


def test_tool_names_the_problem_for_a_mismatched_checkpoint(tiny_cfg_path, tmp_path):
    tool = load_tool('analyze_distortion')
    model = _build_tiny_model(tiny_cfg_path)
    state = model.state_dict()
    torch.save(state, tmp_path / 'ok.pth')
    broken = {k: v for k, v in state.items() if not k.startswith('backbone.stem.')}
    torch.save({'state_dict': broken}, tmp_path / 'nostem.pth')
    base = [tiny_cfg_path, '--pretrained', str(tmp_path / 'ok.pth'), '--device', 'cpu']
    with pytest.raises(KeyError, match=r"run 'x'.*lacks .*backbone.*stem"):
        tool.main(base + ['--finetuned', f'x={tmp_path / "nostem.pth"}'])
    wide = dict(state)
    wide['backbone.layer1.0.conv1.weight'] = torch.zeros(32, 16, 3, 3)
    torch.save({'state_dict': wide}, tmp_path / 'wide.pth')
    with pytest.raises(ValueError, match=r'shape mismatch.*layer1.0.conv1.weight'):
        tool.main(base + ['--finetuned', f'x={tmp_path / "wide.pth"}'])
    with pytest.raises(FileNotFoundError, match='does not exist'):
        tool.main(base + ['--finetuned', f'x={tmp_path / "missing.pth"}'])
    with pytest.raises(SystemExit):  # --convert must name a run
        tool.parse_args(base + ['--finetuned', 'x=a.pth', '--convert', 'y'])


def test_hook_logs_to_the_visualizer_after_before_train_changes(tiny_cfg_path, tmp_path):
    import daft_mm  # noqa: F401
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS
    from mmengine.runner import Runner

    @HOOKS.register_module(force=True)
    class _ScaleStemInBeforeTrain(Hook):
        """Stands in for DAFTHook: rewrites the backbone in before_train at the lowest priority
        and listed after DistortionHook, the worst case for the snapshot order."""
        priority = 'LOWEST'

        def before_train(self, runner) -> None:
            runner.model.backbone.stem[0].weight.data.mul_(3.0)

    cfg = Config.fromfile(tiny_cfg_path)
    cfg.work_dir = str(tmp_path / 'work')
    cfg.train_cfg.max_iters = 2
    cfg.train_cfg.val_interval = 1
    cfg.train_dataloader.batch_size = 2
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 2
    cfg.custom_hooks = [dict(type='DistortionHook', num_images=2),
                        dict(type='_ScaleStemInBeforeTrain')]
    # its own visualizer: one named 'visualizer' by an earlier Runner in this process would
    # write the scalars into that run's work dir
    cfg.visualizer['name'] = cfg.experiment_name = f'distortion_hook_{tmp_path.name}'
    runner = Runner.from_cfg(cfg)
    runner.train()

    files = glob.glob(osp.join(cfg.work_dir, '*', 'vis_data', 'scalars.json'))
    assert len(files) == 1
    records = [json.loads(line) for line in open(files[0])]
    ours = [r for r in records if 'distortion/cosine' in r]
    assert [r['step'] for r in ours] == [1, 2]
    for r in ours:
        assert -1.0 <= r['distortion/cosine'] <= 1.0 and r['distortion/l2'] >= 0
        assert 'distortion/pixel_cosine' in r
        assert {'distortion/rel_change/conv_weight/layer4',
                'distortion/rel_change/bn_running_var/stem'} <= set(r)
    # Training moved the weights, but the snapshot was taken after the x3 in before_train:
    # measured against the pre-hook weights, the stem conv would show a change of ~2.
    last = ours[-1]
    assert last['distortion/rel_change/conv_weight'] > 0
    assert last['distortion/rel_change/conv_weight/stem'] < 0.5
    assert last['distortion/cosine'] < 1.0
    # The snapshot travels in the checkpoint, for resume.
    ckpt = torch.load(osp.join(cfg.work_dir, 'iter_2.pth'), map_location='cpu',
                      weights_only=False)
    ref = ckpt['distortion_reference']
    now = ckpt['state_dict']['backbone.stem.0.weight']
    assert ref['stem.0.weight'].shape == now.shape and not torch.equal(ref['stem.0.weight'], now)


def test_hook_reference_survives_resume_but_not_a_fresh_load():
    """The snapshot saved by before_save_checkpoint is used when training resumes (iter > 0);
    a checkpoint loaded to start a new run (iter == 0) does not replace the fresh snapshot."""
    import logging
    from types import SimpleNamespace

    from daft_mm.mm.hooks.distortion_hook import DistortionHook

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _conv_bn(3, 4)

    model = Model()
    runner = SimpleNamespace(model=model, iter=0, logger=logging.getLogger('test_distortion'))
    first = DistortionHook()
    first._ensure_reference(runner)
    checkpoint: dict = {}
    first.before_save_checkpoint(runner, checkpoint)
    start = checkpoint[DistortionHook.CHECKPOINT_KEY]
    assert torch.equal(start['0.weight'], model.backbone[0].weight)

    model.backbone[0].weight.data.add_(1.0)  # training moved on
    for iteration, expect_start in ((5, True), (0, False)):
        hook = DistortionHook()
        runner.iter = iteration
        hook.after_load_checkpoint(runner, checkpoint)
        hook._ensure_reference(runner)
        ref = hook._reference[0].weight
        assert torch.equal(ref, start['0.weight'] if expect_start else model.backbone[0].weight)
        assert ref is not model.backbone[0].weight and not ref.requires_grad


def test_an_edited_config_is_another_analysis(tiny_cfg_path, tmp_path):
    """Issue 32 item 7: the default folder and the refusal to write over another analysis key
    on the config's resolved content, not only its path."""
    import shutil

    from mmengine.config import Config

    from _tools import load_tool
    from daft_mm.mm import distortion_report as report
    tool = load_tool('analyze_distortion')  # its command line; the rest is the package's
    config = tmp_path / 'mine.py'
    shutil.copy(tiny_cfg_path, config)
    args = tool.parse_args([str(config), '--pretrained', 'p.pth', '--finetuned', 'a=a.pth'])
    before = report.analysis_inputs(args, Config.fromfile(str(config)))
    with open(config, 'a') as f:
        f.write('\ntest_dataloader = dict(batch_size=2)\n')
    after = report.analysis_inputs(args, Config.fromfile(str(config)))
    assert before['config'] == after['config'] and before != after
    assert report.default_out_dir(args, before) != report.default_out_dir(args, after)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'distortion.json').write_text(json.dumps({'inputs': before}))
    report.refuse_other_analysis(str(out), before, overwrite=False)  # the same analysis: fine
    with pytest.raises(FileExistsError, match='holds an analysis of other inputs'):
        report.refuse_other_analysis(str(out), after, overwrite=False)
