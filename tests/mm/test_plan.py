"""DAFT converts what was pretrained, and only that (real Runner, the shipped DAFT configs shrunk,
tiny generated data): fresh heads keep their BatchNorm exactly as initialised; ``load_from`` a
whole model converts every module it holds; the overrides win and conflict loudly."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmseg')

import daft_mm  # noqa: E402,F401  (registers DAFTHook / DAFTModel)
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from daft_mm.mm.hooks import DAFTHook  # noqa: E402
from daft_mm.mm.optim import complete_daft_config  # noqa: E402
from _mm_helpers import CONFIGS, ProbeHook, load_tiny, shrink_config, state_copy  # noqa: E402

torch.set_num_threads(1)
BN_TENSORS = ('weight', 'bias', 'running_mean', 'running_var')


@pytest.fixture(scope='module')
def cfg_path(tmp_path_factory) -> Path:
    return shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py',
                         tmp_path_factory.mktemp('configs'))


def _bn_paths(net: torch.nn.Module) -> List[str]:
    return [name for name, m in net.named_modules() if isinstance(m, _BatchNorm)]


def _train(cfg: Any) -> Dict[str, Any]:
    """Train 1 step; the inner model's state right before and right after DAFT's preparation."""
    runner = Runner.from_cfg(cfg)
    before = ProbeHook(lambda model: state_copy(model.model))
    after = ProbeHook(lambda model: state_copy(model.model))
    runner.register_hook(before, priority='VERY_HIGH')
    runner.register_hook(after, priority='VERY_LOW')
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, DAFTHook))
    return dict(before=before.records[0], after=after.records[0], hook=hook,
                net=runner.model.model, runner=runner)


def _changed(run: Dict[str, Any], layer: str) -> bool:
    return not torch.equal(run['before'][f'{layer}.running_mean'],
                           run['after'][f'{layer}.running_mean'])


def _untouched(run: Dict[str, Any], layer: str) -> bool:
    return all(torch.equal(run['before'][f'{layer}.{t}'], run['after'][f'{layer}.{t}'])
               for t in BN_TENSORS)


def test_pretrained_backbone_is_converted_fresh_heads_stay_as_initialised(
        cityscapes_root, cfg_path, tmp_path):
    run = _train(load_tiny(cfg_path, tmp_path, cityscapes_root, **{
        'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2}))
    bns = _bn_paths(run['net'])
    backbone = [n for n in bns if n.startswith('backbone.')]
    heads = [n for n in bns if not n.startswith('backbone.')]
    assert backbone and heads
    assert all(_changed(run, n) for n in backbone)
    # bit-identical to their initialisation: statistics 0/1, weight 1, bias 0
    assert all(_untouched(run, n) for n in heads)
    assert all(torch.equal(run['after'][f'{n}.running_var'],
                           torch.ones_like(run['after'][f'{n}.running_var'])) for n in heads)
    plan = run['hook'].plan.conversion
    assert list(plan.converted) == backbone and list(plan.left_new) == heads
    assert plan.decided_by == 'pretrained weights'
    assert [p for p, _ in plan.pretrained] == ['backbone']
    assert dict(plan.pretrained)['backbone'].startswith('init_cfg Pretrained ')
    # the same in converted.pth's meta and in every checkpoint's DAFT state
    meta = torch.load(tmp_path / 'converted.pth', map_location='cpu',
                      weights_only=False)['meta']['daft']
    assert meta['converted_layers'] == len(backbone)
    assert meta['plan']['conversion']['left_new'] == heads
    assert meta['plan']['conversion']['pretrained'] == dict(plan.pretrained)
    assert meta['plan']['head_lr_mult'] == 10.0 and meta['plan']['method'] == 'daft'
    report = next(tmp_path.glob('*/daft_bn_conversion.json')).read_text()
    assert '"left_as_initialised"' in report and heads[0] in report


def test_load_from_a_whole_model_converts_every_module_it_holds(cityscapes_root, cfg_path,
                                                                tmp_path):
    """A Cityscapes DeepLabV3 fine-tuned on other data: the checkpoint holds the decode head too.
    A module the checkpoint lacks (here one ASPP branch) or holds with other shapes (the
    auxiliary predictor: another number of classes) is new; the rest of its head is not."""
    cfg = load_tiny(cfg_path, tmp_path, cityscapes_root, pretrained=False, **{
        'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2})
    torch.manual_seed(1)
    source = MODELS.build(cfg.model).model
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    state = {k: v for k, v in source.state_dict().items()
             if not k.startswith('decode_head.aspp_modules.1.')}
    state['auxiliary_head.conv_seg.weight'] = torch.zeros(5, *state[
        'auxiliary_head.conv_seg.weight'].shape[1:])
    state['auxiliary_head.conv_seg.bias'] = torch.zeros(5)
    torch.save({'state_dict': state, 'meta': {}}, tmp_path / 'cityscapes_model.pth')
    cfg.load_from = str(tmp_path / 'cityscapes_model.pth')
    complete_daft_config(cfg)  # the plan reads load_from: complete after changing it
    run = _train(cfg)
    plan = run['hook'].plan.conversion
    assert list(plan.left_new) == ['decode_head.aspp_modules.1.bn']
    assert _untouched(run, 'decode_head.aspp_modules.1.bn')
    for layer in ('backbone.layer1.0.bn1', 'decode_head.aspp_modules.0.bn',
                  'decode_head.bottleneck.bn', 'auxiliary_head.convs.0.bn'):
        assert layer in plan.converted and _changed(run, layer), layer
    reasons = dict(plan.pretrained)
    assert reasons['backbone'] == f'load_from {cfg.load_from}'
    assert 'decode_head.aspp_modules.0' in reasons and 'decode_head' not in reasons
    assert 'auxiliary_head.convs' in reasons and 'auxiliary_head.conv_seg' not in reasons
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert f'backbone (load_from {cfg.load_from})' in log  # the plan, logged once


@pytest.mark.parametrize('options,converted', [
    # an old config's DAFTHook(modules=...) wins over the pretrained weights
    ({'custom_hooks': [dict(type='DAFTHook', modules=['backbone.layer1'])]},
     lambda n: n.startswith('backbone.layer1.')),
    ({'daft_convert_modules': 'all'}, lambda n: True),
    ({'daft_convert_modules': ['backbone', 'auxiliary_head']},
     lambda n: not n.startswith('decode_head.')),
    ({'model.feature_extractor': ['backbone', 'decode_head']},
     lambda n: not n.startswith('auxiliary_head.')),
])
def test_explicit_choices_override_the_pretrained_weights(cityscapes_root, cfg_path, tmp_path,
                                                          options, converted):
    run = _train(load_tiny(cfg_path, tmp_path, cityscapes_root, **{
        'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2, **options}))
    bns = _bn_paths(run['net'])
    assert list(run['hook'].plan.conversion.converted) == [n for n in bns if converted(n)]
    for name in bns:
        assert _changed(run, name) if converted(name) else _untouched(run, name), name


@pytest.mark.parametrize('options,pattern', [
    ({'daft_convert_modules': ['decode_hed']},
     r"daft_convert_modules: .*no submodule 'decode_hed'.*decode_head"),
    ({'daft_convert_modules': 'backbone'}, r"daft_convert_modules='backbone' is neither 'all'"),
    ({'daft_convert_modules': ['backbone'],
      'custom_hooks': [dict(type='DAFTHook', modules=['backbone.layer1'])]},
     r"set twice.*custom_hooks\[DAFTHook\]\.modules=\['backbone\.layer1'\] and "
     r"daft_convert_modules=\['backbone'\]"),
])
def test_a_wrong_choice_fails_at_start_up_naming_the_key(cityscapes_root, cfg_path, tmp_path,
                                                         options, pattern):
    stepped = []

    class NoStep(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            stepped.append(batch_idx)

    runner = Runner.from_cfg(load_tiny(cfg_path, tmp_path, cityscapes_root, **{
        'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2, **options}))
    runner.register_hook(NoStep(), priority='LOWEST')
    with pytest.raises(ValueError, match=pattern):
        runner.train()
    assert not stepped


def test_nothing_pretrained_converts_nothing_and_says_so(cityscapes_root, cfg_path, tmp_path):
    run = _train(load_tiny(cfg_path, tmp_path, cityscapes_root, pretrained=False, **{
        'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2}))
    assert not run['hook'].plan.conversion.converted
    assert all(_untouched(run, n) for n in _bn_paths(run['net']))
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert 'no BatchNorm layer is converted' in log and 'init_cfg' in log
    # integrated LP+FT still ran: the predictors started at zero and trained
    assert not run['after']['decode_head.conv_seg.weight'].any()
    assert run['net'].decode_head.conv_seg.weight.any()


@pytest.mark.parametrize('config', ['daft_faster-rcnn_r50_fpn_voc.py',
                                    'daft_retinanet_r50_fpn_voc.py'])
def test_detection_converts_the_pretrained_backbone_only(voc_det_root, tmp_path, config):
    """ImageNet backbone, new FPN and heads: only the backbone's BN layers are converted, and a
    head with BN (given here to the RetinaNet head) stays as initialised."""
    path = shrink_config(CONFIGS / 'detection' / config, tmp_path)
    options = {'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2}
    if 'retinanet' in config:
        options['model.bbox_head.norm_cfg'] = dict(type='BN', requires_grad=True)
    cfg = load_tiny(path, tmp_path, voc_det_root, **options)
    runner = Runner.from_cfg(cfg)
    before = ProbeHook(state_copy)
    after = ProbeHook(state_copy)
    runner.register_hook(before, priority='VERY_HIGH')
    runner.register_hook(after, priority='VERY_LOW')
    runner.train()
    run = dict(before=before.records[0], after=after.records[0])
    plan = next(h for h in runner.hooks if isinstance(h, DAFTHook)).plan.conversion
    net = runner.model
    bns = _bn_paths(net)
    assert list(plan.converted) == [n for n in bns if n.startswith('backbone.')]
    assert list(plan.left_new) == [n for n in bns if not n.startswith('backbone.')]
    assert all(_changed(run, n) for n in plan.converted)
    assert all(_untouched(run, n) for n in plan.left_new)
    if 'retinanet' in config:
        assert plan.left_new  # the head's BN layers


# ------------------------------------------------------------ what each shipped config converts
def shipped_conversion(name: str) -> Dict[str, Any]:
    """The conversion plan of a shipped DAFT config at full size, nothing downloaded: the
    pretrained modules its ``init_cfg`` names, plus, for a ``load_from`` config, what that
    checkpoint holds, emulated by the same model built with the source task's class counts
    (COCO: 80)."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from daft_mm.mm.loaded import checkpoint_pretrained, init_cfg_pretrained
    from daft_mm.mm.plan import conversion_plan, unwrap
    cfg = Config.fromfile(str(CONFIGS / name))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = unwrap(MODELS.build(cfg.model))
        net = model.model if hasattr(model, 'stage') else model
        pretrained = init_cfg_pretrained(net)
        if cfg.get('load_from') and 'coco' in cfg.load_from:
            source = cfg.model.copy()
            for head in ('bbox_head', 'roi_head'):
                if head in source:
                    source[head] = _with_classes(source[head], 80)
            state = MODELS.build(source).state_dict()
            pretrained.update(checkpoint_pretrained(net, state, cfg.load_from))
    return dict(plan=conversion_plan(net, None, pretrained), net=net, cfg=cfg)


def _with_classes(node: Any, n: int) -> Any:
    if isinstance(node, dict):
        return {k: n if k == 'num_classes' else _with_classes(v, n) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_classes(v, n) for v in node]
    return node


SHIPPED = ['daft_deeplabv3_cityscapes.py', 'daft_deeplabv3_voc.py',
           'new_style/daft_deeplabv3_r50_d8_cityscapes.py', 'demo/daft_demo.py'] + sorted(
    f'detection/{p.name}' for p in (CONFIGS / 'detection').glob('daft_*.py'))


@pytest.mark.parametrize('name', SHIPPED)
def test_every_shipped_daft_config_converts_what_it_loads(name):
    found = shipped_conversion(name)
    plan, net, cfg = found['plan'], found['net'], found['cfg']
    bns = _bn_paths(net)
    backbone = [n for n in bns if n.startswith('backbone.')]
    if name == 'demo/daft_demo.py':
        # the benchmark passes its pretrained backbone as init_cfg; as shipped nothing is
        assert not plan.converted and plan.left_new
    elif cfg.get('load_from'):
        # the whole COCO detector: backbone, FPN and heads, all but the class predictors
        assert 'neck' in dict(plan.pretrained) and backbone
        assert set(backbone) <= set(plan.converted) and not plan.left_new
    else:  # ImageNet backbone: only its BN layers; necks and heads are new
        assert [p for p, _ in plan.pretrained] == ['backbone']
        assert list(plan.converted) == backbone
        assert list(plan.left_new) == [n for n in bns if not n.startswith('backbone.')]


def test_head_modules_setting_resolves_scopes_and_refuses_a_bad_value():
    from torch import nn

    from daft_mm.mm.plan import head_modules
    net = nn.Module()
    net.backbone = nn.Conv2d(3, 4, 1)
    net.decode_head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1))
    preds = ['decode_head.1']
    assert head_modules({}, net, preds) == (['decode_head'], 'new_modules')  # recipe default
    assert head_modules({'daft_head_modules': 'predictors'}, net, preds) == (preds, 'predictors')
    assert head_modules({'daft_head_modules': ['decode_head']}, net, preds)[0] == ['decode_head']
    with pytest.raises(ValueError, match="'decoder_head' is not one of"):
        head_modules({'daft_head_modules': 'decoder_head'}, net, preds)
    with pytest.raises(ValueError, match='leaves the predictors'):
        head_modules({'daft_head_modules': ['decode_head.0']}, net, preds)


def test_a_tracked_instancenorm_in_the_backbone_is_refused_when_the_plan_is_made(
        cityscapes_root, cfg_path, tmp_path):
    """One BN-like test for planning and conversion: a layer conversion would refuse is refused
    when the plan is made (the optimizer constructor), naming it, before any data is read."""
    from daft_mm.core import make_plan

    cfg = load_tiny(cfg_path, tmp_path, cityscapes_root, **{'train_cfg.max_iters': 1})
    runner = Runner.from_cfg(cfg)
    stem = runner.model.model.backbone.stem
    index = next(i for i, m in enumerate(stem) if isinstance(m, _BatchNorm))
    stem[index] = torch.nn.InstanceNorm2d(stem[index].num_features, affine=True,
                                          track_running_stats=True)
    read = []
    runner.register_hook(ProbeHook(read.append), priority='VERY_HIGH')
    with pytest.raises(ValueError, match=rf'backbone\.stem\.{index} \(InstanceNorm2d\): an '
                                         'InstanceNorm normalises each sample'):
        runner.train()
    assert not read, 'refused before the Runner reached before_train'
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.InstanceNorm2d(
        4, track_running_stats=True))
    with pytest.raises(ValueError, match=r'^1 normalisation layer\(s\).*\b1 \(InstanceNorm2d\)'):
        make_plan(net, pretrained=[''], predictors=())


def test_load_from_is_planned_from_the_checkpoint_keys_without_reading_its_data(
        cityscapes_root, cfg_path, tmp_path, monkeypatch):
    from daft_mm.mm import plan as plan_module

    cfg = load_tiny(cfg_path, tmp_path, cityscapes_root, pretrained=False)
    with_backbone = tmp_path / 'whole.pth'
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    state = {k: v for k, v in model.model.state_dict().items()
             if not k.startswith('auxiliary_head')}
    torch.save({'state_dict': state, 'meta': {}}, with_backbone)
    loads = []
    real = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get('map_location'))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', spy)
    plan = plan_module.decide_plan(cfg, model, load_from=str(with_backbone))
    assert loads == ['meta'], 'keys and shapes only: a meta-device load'
    pretrained = dict(plan.conversion.pretrained)
    assert {'backbone', 'decode_head'} <= set(pretrained)
    assert 'auxiliary_head' not in pretrained
    assert all(name.startswith(('backbone.', 'decode_head.')) for name in plan.conversion.converted)
    assert all(name.startswith('auxiliary_head.') for name in plan.conversion.left_new)
