"""OpenMMLab user experience (issue #13): stock flags and tools work with DAFT configs, and no
setting a user changes is silently lost. Real tools as subprocesses, the real Runner, the shipped
configs with their stock base swapped for the tiny one, tiny generated data, CPU."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import daft_mm  # noqa: E402,F401  (registers DAFTHook / DAFTModel)
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from _mm_helpers import (CONFIGS, REPO, TINY, ProbeHook, cpu_env, load_tiny, pretrained_options,  # noqa: E402
                         shrink_config)

torch.set_num_threads(1)
TOOLS = REPO / 'tools'


def _tool(name: str, *args: Any, timeout: int = 300, cwd: Path | None = None,
          env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / f'{name}.py'), *map(str, args)],
                          env=env or cpu_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def _daft_hook(runner: Runner):
    return next(h for h in runner.hooks if type(h).__name__ == 'DAFTHook')


class NoStep(Hook):
    """Records training steps: start-up errors must come before the first one."""

    def __init__(self) -> None:
        self.steps: List[int] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.steps.append(batch_idx)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope='module')
def cfgdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('ux_configs')


@pytest.fixture(scope='module')
def daft_cfg(cfgdir) -> Path:
    """The shipped configs/daft_deeplabv3_cityscapes.py on the tiny DeepLabV3."""
    return shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', cfgdir)


@pytest.fixture(scope='module')
def trained(daft_cfg, cfgdir, cityscapes_root, tmp_path_factory) -> Dict[str, Any]:
    """tools/train.py on a child of the DAFT config that sets daft_head_lr_mult = 20 (2 steps)."""
    child = cfgdir / 'child_lr20.py'
    child.write_text(f"_base_ = ['{daft_cfg}']\ndaft_head_lr_mult = 20.0\n")
    work = tmp_path_factory.mktemp('ux_trained')
    run = _tool('train', child, '--work-dir', work, '--cfg-options',
                f'data_root={cityscapes_root}', 'train_cfg.max_iters=2',
                'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=2',
                'train_dataloader.batch_size=2', *pretrained_options(child))
    assert run.returncode == 0, run.stderr[-4000:]
    return dict(config=child, work=work, log=run.stdout + run.stderr)


# ------------------------------------------------------------------- 1. tools/test.py --tta
def test_tta_on_a_daft_segmentation_config(trained, cityscapes_root, tmp_path):
    run = _tool('test', trained['config'], trained['work'] / 'iter_2.pth', '--tta',
                '--work-dir', tmp_path, '--cfg-options', f'data_root={cityscapes_root}')
    assert run.returncode == 0, run.stderr[-4000:]
    assert 'SegTTAModel' not in run.stderr
    assert re.search(r'\[daft-mm\] seg test metrics: .*mIoU: \d', run.stdout), run.stdout[-2000:]


def test_tta_on_a_daft_detection_config(voc_det_root, cfgdir, tmp_path):
    config = cfgdir / 'daft_det.py'
    config.write_text(f"_base_ = ['{TINY / 'tiny_faster-rcnn_voc.py'}',\n"
                      f"          '{CONFIGS / '_base_' / 'daft_detection.py'}']\n")
    from daft_mm.mm.cli import load_config
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    model = MODELS.build(load_config(str(config)).model)
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, tmp_path / 'det.pth')
    run = _tool('test', config, tmp_path / 'det.pth', '--tta', '--work-dir', tmp_path / 'w',
                '--cfg-options', f'data_root={voc_det_root}/')
    assert run.returncode == 0, run.stderr[-4000:]
    assert '[daft-mm] det test metrics' in run.stdout


# ------------------------------------------------------------- 6. settings take effect
def test_child_config_head_lr_mult_takes_effect_and_is_reported(trained):
    ckpt = torch.load(trained['work'] / 'iter_2.pth', map_location='cpu', weights_only=False)
    lrs = sorted({g['initial_lr'] for g in ckpt['optimizer']['param_groups']})
    assert lrs == pytest.approx([0.05, 1.0])  # base 0.05, predictors 20x
    # the default head (new_modules): the whole decode and auxiliary heads at 20x
    assert re.search(r'DAFTHook: effective start LRs \(predictors: 20 from daft_head_lr_mult\): '
                     r'auxiliary_head 1, auxiliary_head\.conv_seg 1, decode_head 1, '
                     r'decode_head\.conv_seg 1, backbone 0\.05', trained['log']), \
        trained['log'][-3000:]


def test_cfg_options_daft_settings_take_effect(daft_cfg, cityscapes_root, tmp_path):
    cfg = load_tiny(daft_cfg, tmp_path, cityscapes_root, **{
        'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2,
        'daft_head_lr_mult': 5, 'daft_predictors': ['decode_head.conv_seg'],
        'daft_head_modules': 'predictors'})
    runner = Runner.from_cfg(cfg)
    probe = ProbeHook(lambda m: (m.model.decode_head.conv_seg.weight.abs().sum().item(),
                                 m.model.auxiliary_head.conv_seg.weight.abs().sum().item()))
    runner.register_hook(probe, priority='VERY_LOW')
    runner.train()
    decode, aux = probe.records[0]
    assert decode == 0 and aux > 0  # only the named predictor starts at zero
    lrs = _daft_hook(runner).effective_lrs
    assert lrs['decode_head.conv_seg'] == pytest.approx([0.25, 0.25])
    assert 'auxiliary_head.conv_seg' not in lrs and set(lrs['auxiliary_head']) == {0.05}
    assert _daft_hook(runner).plan.predictors == ('decode_head.conv_seg', )


def _legacy_cfg(cfgdir: Path, body: str) -> Path:
    """The DAFT fragment on a stock model (no DAFTModel wrapper): the detection-config style."""
    path = cfgdir / f'fragment_{abs(hash(body))}.py'
    path.write_text(
        f"_base_ = ['{TINY / 'tiny_deeplabv3_cityscapes.py'}',\n"
        f"          '{CONFIGS / '_base_' / 'daft.py'}']\n"
        "param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, by_epoch=False)]\n"
        + body)
    return path


def test_fragment_on_a_stock_model_trains_the_head_at_its_lr(cfgdir, cityscapes_root, tmp_path):
    cfg = load_tiny(_legacy_cfg(cfgdir, ''), tmp_path, cityscapes_root,
                    **{'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2})
    runner = Runner.from_cfg(cfg)
    runner.train()
    net = runner.model
    lr = {id(p): g['initial_lr'] for g in runner.optim_wrapper.optimizer.param_groups
          for p in g['params']}
    assert lr[id(net.decode_head.conv_seg.weight)] == pytest.approx(0.5)
    assert {lr[id(p)] for p in net.backbone.parameters()} == {0.05}


def test_a_config_using_the_removed_daft_paramwise_cfg_names_its_replacement(cfgdir):
    path = _legacy_cfg(cfgdir, 'optim_wrapper = dict(paramwise_cfg={{_base_.daft_paramwise_cfg}})\n')
    from daft_mm.mm.cli import load_config
    with pytest.raises(ValueError, match=r'daft_paramwise_cfg was removed: '
                       r'DAFTOptimWrapperConstructor builds .* daft_head_lr_mult'):
        load_config(str(path))


def test_conflicting_lr_settings_name_both_keys(cfgdir, cityscapes_root, tmp_path):
    cfg = load_tiny(_legacy_cfg(cfgdir, (
        'daft_head_lr_mult = 20.0\n'
        "optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'decode_head.conv_seg': "
        'dict(lr_mult=10.0)}))\n')), tmp_path, cityscapes_root, **{'train_cfg.max_iters': 1})
    runner = Runner.from_cfg(cfg)
    no_step = NoStep()
    runner.register_hook(no_step)
    with pytest.raises(ValueError, match=r"20 from daft_head_lr_mult and optim_wrapper\."
                       r"paramwise_cfg\.custom_keys\['decode_head\.conv_seg'\]\.lr_mult=10"):
        runner.train()
    assert not no_step.steps


def test_dotted_custom_keys_option_is_refused_not_ignored(daft_cfg, cityscapes_root, tmp_path):
    cfg = load_tiny(daft_cfg, tmp_path, cityscapes_root, **{
        'train_cfg.max_iters': 1,
        'optim_wrapper.paramwise_cfg.custom_keys.decode_head.conv_seg.lr_mult': 20})
    with pytest.raises(ValueError, match=r"nested entry 'decode_head\.conv_seg'.*"
                       r"daft_head_lr_mult=<value>"):
        Runner.from_cfg(cfg).train()


def test_conflicting_predictor_settings_name_both_keys(daft_cfg, cityscapes_root, tmp_path):
    cfg = load_tiny(daft_cfg, tmp_path, cityscapes_root, **{
        'train_cfg.max_iters': 1, 'daft_predictors': ['decode_head.conv_seg'],
        'custom_hooks': [dict(type='DAFTHook', predictors=['auxiliary_head.conv_seg'])]})
    with pytest.raises(ValueError, match=r"custom_hooks\[DAFTHook\]\.predictors=.*auxiliary.*"
                       r"daft_predictors=\['decode_head\.conv_seg'\]"):
        Runner.from_cfg(cfg).train()


# ------------------------------------------------------------------ 7. hooks next to DAFTHook
@pytest.mark.parametrize('wrapped', [True, False])
def test_daft_config_without_daft_hook_fails_at_start_up(wrapped, daft_cfg, cfgdir,
                                                         cityscapes_root, tmp_path):
    base = daft_cfg if wrapped else _legacy_cfg(cfgdir, '')
    child = cfgdir / f'only_distortion_{wrapped}.py'
    child.write_text(f"_base_ = ['{base}']\ncustom_hooks = [dict(type='DistortionHook')]\n")
    # the real tool
    run = _tool('train', child, '--work-dir', tmp_path / 'tool', '--cfg-options',
                f'data_root={cityscapes_root}', 'train_cfg.max_iters=1')
    assert run.returncode != 0
    assert "custom_hooks has no DAFTHook" in run.stderr
    assert "custom_hooks = [dict(type='DAFTHook'), dict(type='DistortionHook')]" in run.stderr
    assert not (tmp_path / 'tool' / 'iter_1.pth').exists()
    # the Runner alone (a script of one's own): DistortionHook refuses at start-up
    cfg = load_tiny(child, tmp_path / 'runner', cityscapes_root, **{'train_cfg.max_iters': 1})
    runner = Runner.from_cfg(cfg)
    no_step = NoStep()
    runner.register_hook(no_step)
    with pytest.raises(ValueError, match='custom_hooks has no DAFTHook'):
        runner.train()
    assert not no_step.steps


def test_extra_hooks_next_to_daft_hook(daft_cfg, cfgdir, cityscapes_root, tmp_path):
    child = cfgdir / 'with_distortion.py'
    child.write_text(f"_base_ = ['{daft_cfg}']\n"
                     "custom_hooks = [dict(type='DAFTHook'), dict(type='DistortionHook')]\n")
    cfg = load_tiny(child, tmp_path, cityscapes_root,
                    **{'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2})
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert _daft_hook(runner)._state['done']
    assert any(type(h).__name__ == 'DistortionHook' for h in runner.hooks)


# --------------------------------------------------------------- 4. dist_train.sh on the CPU
def test_dist_train_two_cpu_processes_out_of_the_box(daft_cfg, cityscapes_root, tmp_path):
    env = dict(cpu_env(), PYTHON=sys.executable, PORT=str(29500 + os.getpid() % 1000))
    common = [str(TOOLS / 'dist_train.sh'), str(daft_cfg), '2', '--cfg-options',
              f'data_root={cityscapes_root}', 'train_cfg.max_iters=1',
              'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=1',
              'train_dataloader.batch_size=2',
              'model_wrapper_cfg=None']  # what stock configs have: mmengine's default DDP
    run = subprocess.run(['bash', *common, '--work-dir', str(tmp_path / 'gloo')], env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / 'gloo' / 'iter_1.pth').is_file()

    run = subprocess.run(['bash', *common, 'env_cfg.dist_cfg.backend=nccl', '--work-dir',
                          str(tmp_path / 'nccl')], env=env, capture_output=True, text=True,
                         timeout=400)
    assert run.returncode != 0
    assert re.search(r'Fix: --cfg-options env_cfg\.dist_cfg\.backend=gloo', run.stderr)
    assert 'DistributedDataParallel device_ids' not in run.stderr


def test_cpu_distributed_names_every_key_for_stock_configs():
    from daft_mm.mm.cli import load_config
    if torch.cuda.is_available():
        pytest.skip('the CPU-only path')
    with pytest.raises(RuntimeError) as info:
        load_config(str(CONFIGS / 'daft_deeplabv3_cityscapes.py'), launcher='pytorch')
    message = str(info.value)
    for key in ('env_cfg.dist_cfg.backend=gloo', 'model.model.backbone.norm_cfg.type=BN',
                'model.model.decode_head.norm_cfg.type=BN',
                'model.model.auxiliary_head.norm_cfg.type=BN'):
        assert key in message


# -------------------------------------- 2 + 14. analyze_distortion: --convert, converted.pth
def test_analyze_distortion_convert_and_converted_checkpoint(trained, cityscapes_root,
                                                             tmp_path):
    work = trained['work']
    converted = torch.load(work / 'converted.pth', map_location='cpu', weights_only=False)
    state = converted['state_dict']
    assert converted['meta']['daft']['done']
    assert state['decode_head.conv_seg.weight'].abs().sum() == 0  # right after zero init
    assert 'saved by DAFTHook' not in _tool('analyze_distortion', '--help').stdout

    # cwd without the config's default data root: only --cfg-options data_root can work
    run = _tool('analyze_distortion', trained['config'], '--pretrained', work / 'converted.pth',
                '--finetuned', f'daft={work / "iter_2.pth"}', f'ft={work / "iter_2.pth"}',
                '--reference-converted', f'daft={work / "converted.pth"}', '--convert', 'ft',
                '--convert-split', 'train', '--out-dir', tmp_path / 'out',
                '--cfg-options', f'data_root={cityscapes_root}', 'train_dataloader.batch_size=2',
                timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert re.search(r'converting BN .* train split: 2 batches', run.stdout)
    result = json.loads((tmp_path / 'out' / 'distortion.json').read_text())
    assert result['conversion']['report']['num_batches'] == 2  # one pass of 4 images, batch 2
    assert set(result['runs']['daft']['comparisons']) == {'pretrained', 'converted'}


# ------------------------------------------------------------- 12. conversion to the visualizer
def test_conversion_report_reaches_the_visualizer(trained):
    files = list(trained['work'].glob('*/vis_data/scalars.json'))
    assert files
    keys = set()
    for line in files[0].read_text().splitlines():
        keys |= set(json.loads(line))
    assert any(k.startswith('daft_bn/') and k.endswith('/mean_shift') for k in keys)
    assert any(k.startswith('daft_bn/') and k.endswith('/std_ratio') for k in keys)


# --------------------------------------------------------- 8. resuming an FT checkpoint
def test_resuming_an_ft_checkpoint_with_daft_is_refused_before_the_optimizer(
        cfgdir, daft_cfg, cityscapes_root, tmp_path):
    ft_cfg = shrink_config(CONFIGS / 'baselines' / 'ft_deeplabv3_cityscapes.py', cfgdir)
    cfg = load_tiny(ft_cfg, tmp_path / 'ft', cityscapes_root, **{
        'train_cfg.max_iters': 1, 'default_hooks.checkpoint.interval': 1,
        'train_dataloader.batch_size': 2})
    Runner.from_cfg(cfg).train()
    cfg = load_tiny(daft_cfg, tmp_path / 'daft', cityscapes_root, **{'train_cfg.max_iters': 2})
    cfg.resume, cfg.load_from = True, str(tmp_path / 'ft' / 'iter_1.pth')
    with pytest.raises(RuntimeError, match=r'without DAFTHook state.*load_from=<checkpoint>'):
        Runner.from_cfg(cfg).train()


# ------------------------------------------------------- 9. stock keys on the wrapped model
def test_stock_model_keys_reach_the_wrapped_model(daft_cfg, cityscapes_root, tmp_path):
    cfg = load_tiny(daft_cfg, tmp_path, cityscapes_root, **{
        'model.pretrained': None, 'model.decode_head.dropout_ratio': 0.3})
    model = MODELS.build(cfg.model)  # what Runner.from_cfg does
    assert model.model.decode_head.dropout.p == 0.3
    assert model.model.decode_head.num_classes == 19  # the rest of decode_head is kept
    built = MODELS.build(load_tiny(daft_cfg, tmp_path, cityscapes_root).model.model)
    from daft_mm.mm.models import DAFTModel
    with pytest.raises(TypeError, match=r'model\.model\.backbone'):
        DAFTModel(built, backbone=dict(depth=18))


# ---------------------------------------------------------------- 5. VOC aug layout
def test_generated_voc_feeds_the_shipped_voc_aug_config(voc_seg_root):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    from daft_mm.mm.cli import load_config
    cfg = load_config(str(CONFIGS / 'daft_deeplabv3_voc.py'), {'data_root': voc_seg_root})
    init_default_scope('mmseg')
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    assert len(dataset) == 2 * 4  # train.txt + aug.txt (conftest: 4 training images)
    sample = dataset[len(dataset) - 1]  # from SegmentationClassAug, through the stock pipeline
    assert sample['data_samples'].gt_sem_seg.data.shape[-2:] == (512, 512)



# ------------------------------------------------------------- 10. pure-Python (read_base) style
_TINY_NEW_STYLE = '''from mmengine.config import read_base

with read_base():
    from daft_mm.configs.daft_deeplabv3_r50_d8_cityscapes import *  # noqa: F401,F403

# A user's edits in plain Python: the tiny DeepLabV3 of configs/_tiny_ and small images.
norm = dict(type='BN', requires_grad=True)
model.model.pretrained = None
model.model.data_preprocessor.size = (64, 128)
model.model.backbone.update(depth=18, stem_channels=16, base_channels=16, norm_cfg=norm)
model.model.decode_head.update(in_channels=128, channels=32, dilations=(1, 2, 4, 6), norm_cfg=norm)
model.model.auxiliary_head.update(in_channels=64, channels=16, norm_cfg=norm)
train_dataloader.update(batch_size=2, num_workers=0, persistent_workers=False)
train_dataloader.dataset.pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
    dict(type='RandomCrop', crop_size=(64, 128)), dict(type='PackSegInputs')]
val_dataloader.update(num_workers=0, persistent_workers=False)
val_dataloader.dataset.pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
test_dataloader = val_dataloader
tta_pipeline[1].transforms[0] = [dict(type='Resize', scale_factor=r, keep_ratio=True)
                                 for r in (0.75, 1.0)]
env_cfg.dist_cfg.backend = 'gloo'
daft_head_lr_mult = 20.0
custom_hooks.append(dict(type='DistortionHook', num_images=1))
'''


def test_pure_python_config_end_to_end(cityscapes_root, tmp_path):
    """A pure-Python config in a folder outside the checkout inherits the DAFT config shipped in
    the package (issue 22 item 16), trains and tests through the tools."""
    user = tmp_path / 'my_project' / 'my_daft.py'
    user.parent.mkdir()
    # the tiny backbone of configs/_tiny_ is the one the user's edits make
    checkpoint = pretrained_options(TINY / 'tiny_deeplabv3_cityscapes.py')[1].split('=', 1)[1]
    user.write_text(_TINY_NEW_STYLE + 'model.model.backbone.init_cfg = dict(type=\'Pretrained\', '
                    f'checkpoint={checkpoint!r})\n')
    work = tmp_path / 'work'
    run = _tool('train', user, '--work-dir', work, '--cfg-options',
                f'data_root={cityscapes_root}', 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
                'default_hooks.checkpoint.interval=2', cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    log = run.stdout + run.stderr
    assert 'DAFTHook: effective start LRs (predictors: 20 from daft_head_lr_mult)' in log
    assert 'DAFTHook: BN conversion' in log and 'DistortionHook (1 images' in log
    assert '[daft-mm] seg final validation metrics' in run.stdout
    run = _tool('test', user, work / 'iter_2.pth', '--tta', '--work-dir', tmp_path / 'test',
                '--cfg-options', f'data_root={cityscapes_root}', cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert '[daft-mm] seg test metrics' in run.stdout


# ------------------------------------------- 12 + 11. test_robustness: terminal, JSON, plot
def test_robustness_terminal_has_summaries_and_the_json_the_per_class_tables(
        trained, cityscapes_root, tmp_path):
    run = _tool('test_robustness', trained['config'], trained['work'] / 'iter_2.pth',
                '--corruptions', 'gaussian_noise', 'fog', '--severities', '1', '--work-dir',
                tmp_path, '--cfg-options', f'data_root={cityscapes_root}')
    assert run.returncode == 0, run.stderr[-4000:]
    terminal = run.stdout + run.stderr
    assert 'per class results' not in terminal and '| road ' not in terminal
    assert terminal.count('[robustness]') == 3  # clean + one line per corruption pass
    assert '| gaussian_noise |' in run.stdout and 'mPC' in run.stdout  # the summary table
    result = json.loads((tmp_path / 'robustness.json').read_text())
    assert set(result['per_class']) == {'clean', 'gaussian_noise/1', 'fog/1'}
    assert len(result['per_class']['fog/1']) == 19  # one row per Cityscapes class
    assert set(result['per_class']['clean']['road']) == {'IoU', 'Acc'}
    logs = list(tmp_path.glob('*/*.log'))
    assert logs and 'per class results' in logs[0].read_text()  # the log file keeps them


def test_robustness_plot_names_checkpoint_and_explains_mpc_rpc(tmp_path):
    from daft_mm.mm import robustness as tool
    results = dict(metric='mIoU', checkpoint='work_dirs/daft/iter_40000.pth', clean=60.0,
                   corrupted={'fog': {'1': 50.0, '3': 40.0}})
    results['summary'] = tool.summarize(results)
    title, note = tool.plot(results, [1, 3], str(tmp_path / 'r.png'))
    assert 'iter_40000.pth' in title and 'mPC 45.00' in title and 'rPC 75.0%' in title
    assert 'mPC: mean mIoU over the corruptions' in note and 'rPC: mPC / clean' in note
    assert (tmp_path / 'r.png').stat().st_size > 0


# ----------------------------------------------------- 11. analyze_distortion plots readable
def _distortion_result(bias_outlier: float) -> Dict[str, Any]:
    from daft_mm.core.distortion import QUANTITIES
    layers = [dict(quantity=q, index=i, stage=f'layer{1 + i // 2}',
                   relative=(bias_outlier if (q == 'bn_bias' and i == 1) else 0.01 * (i + 1)))
              for q in QUANTITIES for i in range(4)]
    feats = {'-1': {'per_image': {'cosine': [0.99, 0.98], 'l2': [0.1, 0.2]}}}
    comp = {'features': feats, 'parameters': {'layers': layers}}
    return {'feature_levels': [-1], 'runs': {'DAFT': {'comparisons': {
        'pretrained': comp, 'converted': comp}}}}


def test_distortion_plots_stay_readable(tmp_path):
    from daft_mm.mm import distortion_report as report
    result = _distortion_result(1.4e5)
    scales = report.plot_parameters(result, str(tmp_path / 'p.png'))
    assert scales['bn_bias'] == 'symlog' and scales['bn_weight'] == 'symlog'
    assert scales['bn_running_var'] == 'log'
    legend = report.plot_features(result, str(tmp_path / 'f.png'))
    (first, w0), (second, w1) = legend
    assert first == 'DAFT vs pretrained'
    assert second == 'DAFT vs converted (identical to DAFT vs pretrained)'
    assert w0 > w1  # the earlier curve shows as a band around the later one


# ------------------------------------- issue 22 item 14: the launch scripts find their Python
def _chosen_python(tools: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(['/bin/bash', '-c', f'TOOLS={tools}; source {TOOLS / "_python.sh"}; '
                           'echo "$PYTHON"'], env=env, capture_output=True, text=True, timeout=30)


def test_launch_scripts_choose_python_without_an_activated_environment(tmp_path):
    bare = {'PATH': str(tmp_path / 'empty_bin'), 'HOME': str(tmp_path)}  # no python on PATH
    (tmp_path / 'empty_bin').mkdir()
    project = tmp_path / 'checkout'
    (project / 'tools').mkdir(parents=True)
    missing = _chosen_python(project / 'tools', bare)
    assert missing.returncode == 2 and 'Fix: make install' in missing.stderr
    assert 'PYTHON=/path/to/python' in missing.stderr
    venv_python = project / '.venv' / 'bin' / 'python'
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text('#!/bin/sh\n')
    venv_python.chmod(0o755)
    assert _chosen_python(project / 'tools', bare).stdout.strip() == \
        str(project / 'tools' / '..' / '.venv' / 'bin' / 'python')
    assert _chosen_python(project / 'tools', dict(bare, PYTHON='/opt/py')).stdout.strip() == \
        '/opt/py'


@pytest.mark.skipif(not (REPO / '.venv' / 'bin' / 'python').exists(),
                    reason='needs the project .venv (make install)')
def test_dist_train_runs_with_no_python_on_path(tmp_path):
    env = dict(cpu_env(), PATH='/usr/bin:/bin', PORT=str(29700 + os.getpid() % 200))
    env.pop('PYTHON', None)
    run = subprocess.run(['bash', str(TOOLS / 'dist_train.sh'), 'any_config.py', '1', '--help'],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '--break-lock' in run.stdout  # tools/train.py's help, through torchrun
