"""The shipped detection configs beyond Faster R-CNN, end to end through the real Runner: RetinaNet
(one-stage, focal loss) on VOC and Cityscapes, Mask R-CNN on Cityscapes, DAFT and FT. Each real
config runs with its stock base swapped for a tiny stand-in (tests/_mm_helpers.SWAPS) on generated
data: two training iterations, then an evaluation from the saved checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from mmengine.runner import Runner

from _mm_helpers import CONFIGS, ProbeHook, load_tiny, shrink_config

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')

_PRIOR = -math.log((1 - 0.01) / 0.01)  # focal-loss prior, p = 0.01


@pytest.fixture(scope='module')
def cs_det_root(tmp_path_factory) -> str:
    from daft_mm.mm.datasets import make_cityscapes
    root = tmp_path_factory.mktemp('cityscapes_det')
    make_cityscapes(root, num_train=4, num_val=2, size=(128, 256), seed=0, instances=True)
    return str(root) + '/'


@pytest.fixture(scope='module')
def cfgdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('det_cfgs')


def _options(name: str, roots: dict) -> tuple:
    if 'cityscapes' in name:
        root = roots['cs']
        ann = root + 'annotations/instancesonly_filtered_gtFine_val.json'
        return root, {'val_evaluator.ann_file': ann, 'test_evaluator.ann_file': ann}
    return roots['voc'], {}


@pytest.fixture(scope='module')
def roots(cs_det_root, voc_det_root) -> dict:
    return {'cs': cs_det_root, 'voc': voc_det_root}


CASES = [
    ('daft_retinanet_r50_fpn_voc.py', 'pascal_voc/mAP'),
    ('daft_retinanet_r50_fpn_cityscapes.py', 'coco/bbox_mAP'),
    ('daft_mask-rcnn_r50_fpn_cityscapes.py', 'coco/segm_mAP'),
    ('ft_retinanet_r50_fpn_voc.py', 'pascal_voc/mAP'),
]


def _state(model: torch.nn.Module) -> dict:
    """What DAFT must have done before the first step (read by a probe after DAFTHook)."""
    modules = dict(model.named_modules())
    out = {'bn_eval': [n for n, m in modules.items()
                       if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.training],
           'frozen': [n for n, p in model.named_parameters() if not p.requires_grad]}
    for name in ('bbox_head.retina_cls', 'bbox_head.retina_reg', 'roi_head.bbox_head.fc_cls',
                 'roi_head.bbox_head.fc_reg', 'roi_head.mask_head.conv_logits'):
        if name in modules:
            out[name] = (modules[name].weight.abs().sum().item(),
                         modules[name].bias.detach().clone())
    return out


@pytest.mark.parametrize('name,metric', CASES)
def test_detection_config_trains_and_evaluates(name, metric, roots, cfgdir, tmp_path):
    cfg_path = shrink_config(CONFIGS / 'detection' / name, cfgdir)
    root, extra = _options(name, roots)
    cfg = load_tiny(cfg_path, tmp_path, root, **{
        'train_cfg.max_iters': 2, 'train_dataloader.batch_size': 2,
        'default_hooks.checkpoint.interval': 2, **extra})
    runner = Runner.from_cfg(cfg)
    probe = ProbeHook(_state)
    runner.register_hook(probe, priority='VERY_LOW')  # after DAFTHook's preparation
    runner.train()
    state = probe.records[0]
    assert not state['bn_eval'] and not state['frozen']  # BN trains, nothing frozen
    first_loss_cls = runner.message_hub.get_scalar('train/loss_cls').data[0][0]
    if name.startswith('daft_'):
        zeroed = [k for k in state if '.' in k]
        assert zeroed and all(state[k][0] == 0.0 for k in zeroed)
        if 'retinanet' in name:
            # the focal-loss prior survives the zero init: p = 0.01, not 0.5
            assert torch.allclose(state['bbox_head.retina_cls'][1], torch.tensor(_PRIOR))
            assert not state['bbox_head.retina_reg'][1].any()
            assert first_loss_cls < 5.0  # ~1.1; a zeroed prior starts the focal loss near 100
        else:
            assert not state['roi_head.mask_head.conv_logits'][1].any()
        hook = next(h for h in runner.hooks if type(h).__name__ == 'DAFTHook')
        assert hook._state['done'] and hook._state['converted_layers'] > 0
    else:
        assert all(state[k][0] > 0 for k in state if '.' in k)  # standard init
    assert math.isfinite(first_loss_cls)

    if 'retinanet' in name:
        # two iterations from the p = 0.01 prior score no box above the stock 0.05 threshold;
        # COCO's metric has nothing to evaluate then
        extra['model.test_cfg.score_thr'] = 0.0
    elif 'mask-rcnn' in name:  # the same for zeroed box classifiers after two iterations
        extra['model.test_cfg.rcnn.score_thr'] = 0.0
    test_cfg = load_tiny(cfg_path, tmp_path / 'test', root, **extra)
    test_cfg.load_from = str(tmp_path / 'iter_2.pth')
    metrics = Runner.from_cfg(test_cfg).test()
    assert 0.0 <= metrics[metric] <= 1.0


NEW = [f'detection/{m}_{model}_{d}.py' for m in ('daft', 'ft')
       for model, d in (('retinanet_r50_fpn', 'voc'), ('retinanet_r50_fpn', 'cityscapes'),
                        ('mask-rcnn_r50_fpn', 'cityscapes'))]


@pytest.mark.parametrize('name', NEW)
def test_full_size_configs_resolve_with_bn_training(name):
    cfg = Config.fromfile(str(CONFIGS / name))
    backbone = cfg.model.backbone
    assert backbone.norm_eval is False and backbone.frozen_stages == -1
    norm = dict(backbone.norm_cfg)
    assert norm.pop('eps', 1e-5) == 1e-5  # the fragment spells out torch's default
    assert norm == dict(type='SyncBN', requires_grad=True)
    assert cfg.model.type == ('MaskRCNN' if 'mask-rcnn' in name else 'RetinaNet')
    hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
    if name.startswith('detection/daft'):
        assert hooks == ['DAFTHook']
        # no substring keys copied into the config: the DAFT constructor derives the entries
        # when the optimizer is built
        assert not cfg.optim_wrapper.get('paramwise_cfg')
    else:
        assert 'DAFTHook' not in hooks and not cfg.optim_wrapper.get('paramwise_cfg')
    if 'cityscapes' in name:
        head = cfg.model.roi_head.bbox_head if 'mask' in name else cfg.model.bbox_head
        assert head.num_classes == 8


@pytest.mark.parametrize('config,predictors,untouched', [
    # GA-RPN's rpn_head has conv_cls / conv_reg, which the old substring keys matched; it is a
    # proposal generator, not a predictor of the task, and keeps the backbone's LR
    ('guided_anchoring/ga-faster-rcnn_r50-caffe_fpn_1x_coco.py',
     ['roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg'], ['rpn_head.conv_cls']),
    # DETR-type MLP branches: only each branch's last Linear is a predictor; the layers inside
    # the branch (reg_branches.{i}.0 / .2) train at the backbone's LR
    ('deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
     [f'bbox_head.cls_branches.{i}' for i in range(6)]
     + [f'bbox_head.reg_branches.{i}.4' for i in range(6)],
     [f'bbox_head.reg_branches.{i}.{j}' for i in range(6) for j in (0, 2)]),
])
def test_the_head_lr_reaches_exactly_the_predictors(config, predictors, untouched):
    """The LR groups the hook derives for a stock detector + the detection fragment, through
    mmengine's own optimizer constructor: each predictor at 10x, every other parameter at 1x."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope

    import mmdet
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / '.mim' / 'configs' / config))
    cfg.merge_from_dict(dict(model=dict(backbone=dict(
        norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, frozen_stages=-1,
        init_cfg=None))))
    daft = Config.fromfile(str(CONFIGS / '_base_' / 'daft_detection.py'))
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)

    def built(custom_keys=None):
        paramwise = dict(daft=dict(head_lr_mult=daft.daft_head_lr_mult,
                                   head_modules=daft.daft_head_modules))
        if custom_keys:
            paramwise['custom_keys'] = custom_keys
        return build_optim_wrapper(model, dict(
            type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01),
            constructor='DAFTOptimWrapperConstructor', paramwise_cfg=paramwise))

    optim = built()
    plan = optim.daft_plan
    assert list(plan.predictors) == predictors and list(plan.head_modules) == predictors
    lr = {id(p): g['lr'] for g in optim.param_groups for p in g['params']}
    inside = {id(p) for name in predictors for p in model.get_submodule(name).parameters()}
    for name, param in model.named_parameters():
        assert lr[id(param)] == pytest.approx(0.1 if id(param) in inside else 0.01), name
    for name in untouched:
        assert all(lr[id(p)] == pytest.approx(0.01)
                   for p in model.get_submodule(name).parameters()), name
    # a user's own paramwise_cfg: other modules' entries are kept, a predictor's entry with
    # another multiplier is an error naming both keys
    with pytest.raises(ValueError, match=r"set twice.*10 from daft_head_lr_mult and "
                       r"optim_wrapper\.paramwise_cfg\.custom_keys\['" + predictors[0]):
        built({'neck': dict(lr_mult=0.5), predictors[0]: dict(lr_mult=3.0)})
    merged = built({'neck': dict(lr_mult=0.5)})
    lr = {id(p): g['lr'] for g in merged.param_groups for p in g['params']}
    assert all(lr[id(p)] == pytest.approx(0.005) for p in model.neck.parameters())
