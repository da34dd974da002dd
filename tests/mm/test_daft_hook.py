"""The OpenMMLab layer end to end: real Runner, real mmseg/mmdet models, the shipped DAFT configs
with their stock base swapped for a tiny one, tiny generated Cityscapes / VOC data, CPU."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from _tools import load_tool
import torch
import torch.nn.functional as F

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import daft_mm  # noqa: E402,F401  (registers DAFTHook / DAFTModel)
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from daft_mm.mm.models import DAFTModel  # noqa: E402

from _mm_helpers import (CONFIGS, REPO, TINY, ProbeHook, cpu_env, load_tiny,  # noqa: E402
                         shrink_config, state_copy)

torch.set_num_threads(1)


def _load(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location='cpu', weights_only=False)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope='module')
def data(cityscapes_root, voc_seg_root, voc_det_root) -> Dict[str, str]:
    """The session datasets of conftest.py (Cityscapes layout, VOC for mmseg and for mmdet)."""
    return dict(cs=cityscapes_root, vseg=voc_seg_root, vdet=voc_det_root)


@pytest.fixture(scope='module')
def cfgdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('configs')


class LRProbe(Hook):
    """(predictor lr, backbone lr) before every step."""

    def __init__(self) -> None:
        self.lrs = []

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        net = runner.model.model
        head, back = net.decode_head.conv_seg.weight, net.backbone.conv1.weight if hasattr(
            net.backbone, 'conv1') else next(net.backbone.parameters())
        lr = {}
        for group in runner.optim_wrapper.optimizer.param_groups:
            for p in group['params']:
                if p is head:
                    lr['head'] = group['lr']
                if p is back:
                    lr['back'] = group['lr']
        self.lrs.append((lr['head'], lr['back']))


def _seg_probe(batch):
    """Eval-mode features entering decode_head.conv_seg, logits, predictor, state."""

    def fn(model):
        net = model.model
        feats = {}
        handle = net.decode_head.conv_seg.register_forward_pre_hook(
            lambda m, a: feats.__setitem__('x', a[0].detach().clone()))
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                data = model.data_preprocessor(batch, False)
                logits = net(data['inputs'], data['data_samples'], mode='tensor')
        finally:
            handle.remove()
            for m, mode in modes:
                m.training = mode
        conv = net.decode_head.conv_seg
        return dict(feat=feats['x'], logits=logits, w=conv.weight.detach().clone(),
                    b=conv.bias.detach().clone(), state=state_copy(net))

    return fn


@pytest.fixture(scope='module')
def cs_run(data, cfgdir, tmp_path_factory) -> Dict[str, Any]:
    """One DAFT training run (4 iters) of the shipped Cityscapes DAFT config, shrunk."""
    work = tmp_path_factory.mktemp('cs_daft')
    cfg_path = shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', cfgdir)
    cfg = load_tiny(cfg_path, work, data['cs'], **{
        'train_cfg.max_iters': 4, 'default_hooks.checkpoint.interval': 2,
        'train_dataloader.batch_size': 2})
    runner = Runner.from_cfg(cfg)
    batch = next(iter(Runner.build_dataloader(cfg.test_dataloader)))
    before, after, lrs = ProbeHook(_seg_probe(batch)), ProbeHook(_seg_probe(batch)), LRProbe()
    runner.register_hook(before, priority='VERY_HIGH')
    runner.register_hook(after, priority='VERY_LOW')
    runner.register_hook(lrs)
    runner.train()
    return dict(cfg_path=cfg_path, work=work, before=before.records[0], after=after.records[0],
                lrs=lrs.lrs, model=runner.model, batch=batch)


# ------------------------------------------------------------------------------ DAFT in a Runner
def test_conversion_keeps_function_and_zeroes_predictors(cs_run):
    before, after = cs_run['before'], cs_run['after']
    # The network below the predictor computes the same function in eval mode ...
    torch.testing.assert_close(after['feat'], before['feat'], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(F.conv2d(after['feat'], before['w'], before['b']),
                               before['logits'], rtol=1e-4, atol=1e-4)
    # ... with new BN statistics (measured on the training data) ...
    key = 'backbone.layer1.0.bn1.running_mean'
    assert not torch.allclose(before['state'][key], after['state'][key])
    # ... and the predictors start at zero (decode and auxiliary head).
    assert after['w'].abs().sum() == 0 and after['b'].abs().sum() == 0
    aux = after['state']['auxiliary_head.conv_seg.weight']
    assert aux.abs().sum() == 0
    assert before['state']['auxiliary_head.conv_seg.weight'].abs().sum() > 0
    # Training then moved them, with BN in train mode.
    net = cs_run['model'].model
    assert net.decode_head.conv_seg.weight.abs().sum() > 0
    assert net.backbone.layer1[0].bn1.training


def test_predictor_lr_ratio_holds_to_the_end(cs_run):
    lrs = cs_run['lrs']
    assert len(lrs) == 4
    # the stock PolyLR floor (eta_min=1e-4, absolute) is a floor per group: the ratio holds at
    # every step, the last included (a shared floor would shrink it to 1 there)
    for head, back in lrs:
        assert back > 0 and head == pytest.approx(10 * back, rel=1e-9), lrs


def test_checkpoint_holds_daft_state_and_stock_keys(cs_run):
    ckpt = _load(cs_run['work'] / 'iter_4.pth')
    assert ckpt['daft']['done'] and ckpt['daft']['converted_layers'] > 0
    assert ckpt['daft']['zeroed'] == ['decode_head.conv_seg', 'auxiliary_head.conv_seg']
    stock = Config.fromfile(str(TINY / 'tiny_deeplabv3_cityscapes.py'))
    stock_keys = set(MODELS.build(stock.model).state_dict())
    assert set(ckpt['state_dict']) == stock_keys
    assert (cs_run['work'] / 'daft_bn_conversion.json').exists() or list(
        cs_run['work'].glob('*/daft_bn_conversion.json'))


def _miou(output: str) -> float:
    match = re.search(r'mIoU: ([0-9.]+)', output)
    assert match, output[-3000:]
    return float(match.group(1))


def test_tools_test_reports_miou_and_stock_config_agrees(cs_run, data, tmp_path):
    ckpt = str(cs_run['work'] / 'iter_4.pth')
    root = data['cs']
    proc = subprocess.run(
        [sys.executable, 'tools/test.py', str(cs_run['cfg_path']), ckpt, '--work-dir',
         str(tmp_path / 'daft'), '--cfg-options', f'data_root={root}'],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    daft_miou = _miou(proc.stdout)
    # The same checkpoint in the stock config of the same model (no daft_mm in the config).
    metrics = load_tool('test').main([str(TINY / 'tiny_deeplabv3_cityscapes.py'), ckpt, '--work-dir',
                         str(tmp_path / 'stock'), '--cfg-options', f'data_root={root}'])
    assert round(float(metrics['mIoU']), 4) == pytest.approx(daft_miou, abs=1e-4)


def test_resume_neither_converts_nor_zeroes_again(cs_run, data, tmp_path):
    mid = cs_run['work'] / 'iter_2.pth'
    saved = _load(mid)['state_dict']
    cfg = load_tiny(cs_run['cfg_path'], tmp_path, data['cs'], **{
        'train_cfg.max_iters': 3, 'train_dataloader.batch_size': 2,
        'default_hooks.checkpoint.interval': 1})
    cfg.resume, cfg.load_from = True, str(mid)
    runner = Runner.from_cfg(cfg)
    probe = ProbeHook(lambda model: state_copy(model.model))
    runner.register_hook(probe, priority='VERY_LOW')
    runner.train()
    state = probe.records[0]
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert state['decode_head.conv_seg.weight'].abs().sum() > 0
    assert _load(tmp_path / 'iter_3.pth')['daft']['done']


def test_ema_hook_averages_from_the_converted_model(data, cfgdir, tmp_path):
    """EMAHook copies the model in before_run, before DAFT converts it; its first update copies
    the source weights, so the average starts from the converted model, not the pretrained one."""
    cfg = _daft_cfg(data, cfgdir, tmp_path, **{'optim_wrapper.optimizer.lr': 1e-12})
    cfg.custom_hooks = list(cfg.custom_hooks) + [dict(type='EMAHook', momentum=0.5)]
    runner = Runner.from_cfg(cfg)
    params = lambda model: {k: v.detach().clone() for k, v in model.named_parameters()}  # noqa
    before, after = ProbeHook(params), ProbeHook(params)
    runner.register_hook(before, priority='HIGHEST')  # before DAFTHook: pretrained
    runner.register_hook(after, priority='LOWEST')  # after it: converted
    runner.train()
    ema = next(h for h in runner.hooks if type(h).__name__ == 'EMAHook')
    averaged = params(ema.ema_model.module)
    pretrained, converted = before.records[0], after.records[0]
    bn_weight = 'model.backbone.layer1.0.bn1.weight'
    assert not torch.allclose(pretrained[bn_weight], converted[bn_weight], atol=1e-3)
    for key, value in converted.items():
        torch.testing.assert_close(averaged[key], value, rtol=0, atol=1e-6, msg=key)


def test_state_dict_is_the_wrapped_models():
    cfg = Config.fromfile(str(TINY / 'tiny_deeplabv3_cityscapes.py'))
    torch.manual_seed(0)
    stock = MODELS.build(cfg.model)
    wrapped = DAFTModel(model=cfg.model, method='ft')
    assert list(wrapped.state_dict()) == list(stock.state_dict())
    wrapped.load_state_dict(stock.state_dict(), strict=True)
    other = MODELS.build(cfg.model)
    other.load_state_dict(wrapped.state_dict(), strict=True)
    for key, value in stock.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    # attributes of the wrapped model read through the wrapper
    assert wrapped.decode_head is wrapped.model.decode_head
    assert wrapped.data_preprocessor is wrapped.model.data_preprocessor
    # copies (EMA hooks deep-copy the model) keep the sharing and the transparent keys
    clone = copy.deepcopy(wrapped)
    assert clone.data_preprocessor is clone.model.data_preprocessor
    assert list(clone.state_dict()) == list(stock.state_dict())


# ------------------------------------------------------------------------------ other datasets
def test_daft_voc_trains_and_reports_miou(data, cfgdir, tmp_path):
    cfg_path = shrink_config(CONFIGS / 'daft_deeplabv3_voc.py', cfgdir)
    cfg = load_tiny(cfg_path, tmp_path, data['vseg'], **{
        'train_cfg.max_iters': 2, 'train_dataloader.batch_size': 2,
        'default_hooks.checkpoint.interval': 2})
    Runner.from_cfg(cfg).train()
    test_cfg = load_tiny(cfg_path, tmp_path / 'test', data['vseg'])
    test_cfg.load_from = str(tmp_path / 'iter_2.pth')
    metrics = Runner.from_cfg(test_cfg).test()
    assert 0.0 <= metrics['mIoU'] <= 100.0


def test_daft_faster_rcnn_voc_trains_and_reports_map(data, cfgdir, tmp_path):
    cfg_path = shrink_config(CONFIGS / 'detection' / 'daft_faster-rcnn_r50_fpn_voc.py', cfgdir)
    cfg = load_tiny(cfg_path, tmp_path, data['vdet'], **{
        'train_cfg.max_iters': 2, 'default_hooks.checkpoint.interval': 2})
    runner = Runner.from_cfg(cfg)
    probe = ProbeHook(lambda model: (model.roi_head.bbox_head.fc_cls.weight.abs().sum().item(),
                                     model.roi_head.bbox_head.fc_reg.weight.abs().sum().item(),
                                     model.backbone.norm_eval))
    runner.register_hook(probe, priority='VERY_LOW')
    runner.train()
    assert probe.records[0] == (0.0, 0.0, False)
    test_cfg = load_tiny(cfg_path, tmp_path / 'test', data['vdet'])
    test_cfg.load_from = str(tmp_path / 'iter_2.pth')
    metrics = Runner.from_cfg(test_cfg).test()
    assert 'pascal_voc/mAP' in metrics and 0.0 <= metrics['pascal_voc/mAP'] <= 1.0


# ------------------------------------------------------------------------------------ baselines
def test_lp_then_lpft_from_the_lp_checkpoint(data, cfgdir, tmp_path):
    root = data['cs']
    lp_path = shrink_config(CONFIGS / 'baselines' / 'lp_deeplabv3_cityscapes.py', cfgdir)
    cfg = load_tiny(lp_path, tmp_path / 'lp', root, **{
        'train_cfg.max_iters': 2, 'train_dataloader.batch_size': 2,
        'default_hooks.checkpoint.interval': 2})
    runner = Runner.from_cfg(cfg)
    start = ProbeHook(lambda model: state_copy(model.model))
    runner.register_hook(start, priority='VERY_LOW')
    runner.train()
    net, init = runner.model.model, start.records[0]
    trained = net.state_dict()
    # LP: backbone weights and BN statistics untouched, BN kept in eval mode, heads trained.
    for key, value in init.items():
        if key.startswith('backbone.'):
            assert torch.equal(trained[key], value), key
    assert not torch.equal(trained['decode_head.conv_seg.weight'],
                           init['decode_head.conv_seg.weight'])
    assert runner.model.training and not net.backbone.layer1[0].bn1.training
    assert net.decode_head.bottleneck.bn.training
    # Frozen before the optimizer was built: no gradient, so no momentum or weight-decay state.
    state = runner.optim_wrapper.optimizer.state
    assert all(p.grad is None and not state.get(p) for p in net.backbone.parameters())
    assert all(state.get(p) for p in net.decode_head.parameters())

    lpft_path = cfgdir / 'tiny_lpft_deeplabv3_cityscapes.py'
    shrink_config(CONFIGS / 'baselines' / 'lpft_deeplabv3_cityscapes.py', cfgdir)
    cfg2 = load_tiny(lpft_path, tmp_path / 'lpft', root, **{
        'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2,
        'load_from': str(tmp_path / 'lp' / 'iter_2.pth')})
    runner2 = Runner.from_cfg(cfg2)
    start2 = ProbeHook(lambda model: state_copy(model.model))
    runner2.register_hook(start2, priority='VERY_LOW')
    runner2.train()
    for key, value in trained.items():  # stage 2 starts exactly from the LP weights
        assert torch.equal(start2.records[0][key], value), key
    in_optim = {id(p) for g in runner2.optim_wrapper.optimizer.param_groups for p in g['params']}
    assert all(id(p) in in_optim for p in runner2.model.model.backbone.parameters())
    assert runner2.model.model.backbone.layer1[0].bn1.training


# ------------------------------------------------------------------------- start-up config errors
def _daft_cfg(data, cfgdir, tmp_path, **options):
    cfg_path = shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', cfgdir)
    options.setdefault('train_cfg.max_iters', 1)
    options.setdefault('train_dataloader.batch_size', 2)
    return load_tiny(cfg_path, tmp_path, data['cs'], **options)


def _hook_only_cfg(data, cfgdir, tmp_path, **options):
    """The stock tiny model (no wrapper) + the DAFT fragment: the detection-config style."""
    path = cfgdir / 'hook_only.py'
    path.write_text(
        f"_base_ = ['{TINY / 'tiny_deeplabv3_cityscapes.py'}',\n"
        f"          '{CONFIGS / '_base_' / 'daft.py'}']\n"
        "param_scheduler = [\n"
        "    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, by_epoch=False)]\n")
    options.setdefault('train_cfg.max_iters', 1)
    options.setdefault('train_dataloader.batch_size', 2)
    return load_tiny(path, tmp_path, data['cs'], **options)


@pytest.mark.parametrize('style,options,error,pattern', [
    ('hook', {'custom_hooks': [dict(type='DAFTHook', predictors=['decode_head.conv_sge'])]},
     ValueError, r"custom_hooks\[DAFTHook\]\.predictors.*decode_head\.conv_seg"),
    ('hook', {'custom_hooks': [dict(type='DAFTHook', modules=['backbone.layer9'])]},
     ValueError, r"custom_hooks\[DAFTHook\]\.modules.*layer9"),
    ('hook', {'model.backbone.norm_eval': True},
     ValueError, r"model\.backbone\.norm_eval.*norm_eval=False"),
    ('hook', {'optim_wrapper.paramwise_cfg': None, 'daft_head_lr_mult': 1.0},
     ValueError, r"not above the rest.*daft_head_lr_mult=10"),
    ('wrapper', {'custom_hooks': []}, RuntimeError, r"DAFTHook.*custom_hooks"),
    ('wrapper', {'model.method': 'ft'}, ValueError, r"model\.method='ft'.*remove DAFTHook"),
])
def test_config_mistakes_fail_at_start_up(data, cfgdir, tmp_path, style, options, error, pattern):
    build = _hook_only_cfg if style == 'hook' else _daft_cfg
    stepped = []

    class NoStep(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            stepped.append(batch_idx)

    cfg = build(data, cfgdir, tmp_path, **options)
    if options.get('custom_hooks') == []:
        cfg.custom_hooks = []
    runner = Runner.from_cfg(cfg)
    runner.register_hook(NoStep(), priority='LOWEST')
    with pytest.raises(error, match=pattern):
        runner.train()
    assert not stepped  # failed before any optimisation step


@pytest.mark.parametrize('options,pattern', [
    ({'model.predictors': ['decode_head.nope']}, r"model\.predictors.*decode_head"),
    ({'model.model.backbone.norm_eval': True}, r"model\.model\.backbone\.norm_eval.*False"),
    ({'model.method': 'lp-ft'}, r"two configs.*load_from"),
    ({'model.feature_extractor': ['backbone.stem9']}, r"model\.feature_extractor.*stem"),
])
def test_wrapper_config_mistakes_fail_when_the_model_is_built(data, cfgdir, tmp_path, options,
                                                              pattern):
    cfg = _daft_cfg(data, cfgdir, tmp_path, **options)
    with pytest.raises(ValueError, match=pattern):
        MODELS.build(cfg.model)  # what Runner.from_cfg does first


def test_resuming_a_non_daft_checkpoint_is_refused(cs_run, data, cfgdir, tmp_path):
    ckpt = _load(cs_run['work'] / 'iter_2.pth')
    del ckpt['daft']  # as if that run had no DAFTHook
    torch.save(ckpt, tmp_path / 'no_daft.pth')
    cfg = _daft_cfg(data, cfgdir, tmp_path, **{'train_cfg.max_iters': 3})
    cfg.resume, cfg.load_from = True, str(tmp_path / 'no_daft.pth')
    with pytest.raises(RuntimeError, match=r'without DAFTHook state.*load_from'):
        Runner.from_cfg(cfg).train()


# ------------------------------------------------------------------------------ shipped configs
SEG = ['daft_deeplabv3_cityscapes.py', 'daft_deeplabv3_voc.py'] + [
    f'baselines/{m}_deeplabv3_{d}.py' for m in ('ft', 'lp', 'lpft') for d in ('cityscapes', 'voc')]
DET = [f'detection/{m}_faster-rcnn_r50_fpn_{d}.py' for m in ('daft', 'ft')
       for d in ('cityscapes', 'voc')]


@pytest.mark.parametrize('name', SEG + DET)
def test_shipped_configs_resolve_against_the_installed_stock_bases(name):
    cfg = Config.fromfile(str(CONFIGS / name))
    method = name.split('/')[-1].split('_')[0]
    hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
    from daft_mm.mm.optim import complete_daft_config
    complete_daft_config(cfg)  # what loading it with tools/train.py adds
    kinds = {s['type'] for s in cfg.param_scheduler}
    if name in SEG:
        assert cfg.model.type == 'DAFTModel' and cfg.model.model.type == 'EncoderDecoder'
        assert cfg.model.method == {'lpft': 'ft'}.get(method, method)
        assert cfg.model.model.backbone.norm_eval is False
    else:
        assert cfg.model.type == 'FasterRCNN' and cfg.model.backbone.norm_eval is False
    if method == 'daft':
        assert hooks == ['DAFTHook']
        # the constructor builds the head's groups from the final keys
        assert cfg.optim_wrapper.constructor == 'DAFTOptimWrapperConstructor'
        assert cfg.optim_wrapper.paramwise_cfg.daft.head_lr_mult == 10.0
        assert 'PolyLR' not in kinds  # the stock floor, kept per param group
    else:
        assert 'DAFTHook' not in hooks and not cfg.optim_wrapper.get('paramwise_cfg')
        assert 'constructor' not in cfg.optim_wrapper
    if method == 'lpft':
        assert cfg.load_from.startswith('work_dirs/lp_deeplabv3_')


def test_fragment_works_with_read_base_style(tmp_path):
    """The fragment has no `_base_` and no `{{ }}`: mmengine's pure-Python (read_base) style
    imports it as well."""
    (tmp_path / '_base_').mkdir()
    fragment = REPO / 'daft_mm' / 'configs' / '_base_' / 'daft.py'  # configs/_base_ points here
    (tmp_path / '_base_' / 'daft.py').write_text(fragment.read_text())
    (tmp_path / 'user.py').write_text(
        'from mmengine.config import read_base\n\n'
        'with read_base():\n'
        '    from ._base_.daft import *  # noqa: F401,F403\n\n'
        "optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01))\n")
    cfg = Config.fromfile(str(tmp_path / 'user.py'))
    assert cfg.custom_hooks[0]['type'] == 'DAFTHook'
    from daft_mm.mm.optim import complete_daft_config
    complete_daft_config(cfg)  # what load_config does
    assert cfg.optim_wrapper.constructor == 'DAFTOptimWrapperConstructor'
    assert cfg.optim_wrapper.paramwise_cfg.daft.head_lr_mult == 10.0


def test_lp_keeps_mmcv_syncbn_in_eval_mode(tmp_path):
    """mmcv's MMSyncBN is no ``_BatchNorm``: LP's BN freezing, conversion and the checks share one
    BN-like test (``daft_mm.core.is_batchnorm``), so LP keeps it in eval mode after ``train()``
    like any BN (it stayed in train mode before, its statistics drifting under a frozen LP)."""
    import socket

    import torch.distributed as dist
    from mmcv.ops import SyncBatchNorm as MMSyncBN

    from daft_mm.core import is_batchnorm, split_batchnorms
    with socket.socket() as sock:  # a free port on this machine for a one-rank gloo group
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        cfg = Config.fromfile(str(TINY / 'tiny_deeplabv3_cityscapes.py'))
        cfg.model.backbone.norm_cfg = dict(type='MMSyncBN', requires_grad=True)
        model = DAFTModel(model=cfg.model, method='lp')
        bns = [m for m in model.model.backbone.modules() if isinstance(m, MMSyncBN)]
        assert bns and all(is_batchnorm(m) for m in bns)
        model.train()
        assert not any(m.training for m in bns)  # frozen statistics under LP
        assert model.model.decode_head.training
        converted, _ = split_batchnorms(model.model, ['backbone'])
        assert len(converted) == len(bns)
    finally:
        dist.destroy_process_group()
