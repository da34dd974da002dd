"""The head table (daft_mm.mm.predictors), priors from the head's own init, the BN-train check
(norm_eval, frozen_stages, requires_grad=False) and BN-like layers (mmcv's MMSyncBN) in the
conversion: on real mmdet models built from the tiny configs, and on small stand-ins."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.model import BaseModule
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from _mm_helpers import REPO, TINY
from daft_mm.core import ConversionError, convert_bn, find_batchnorms, zero_init_predictors
from daft_mm.mm.models import DAFTModel
from daft_mm.mm.preparation import require_bn_train
from daft_mm.mm.predictors import (default_predictors, find_heads, predictor_priors,
                                   register_head_predictors, registered_heads)

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')

PRIOR = -math.log((1 - 0.01) / 0.01)  # bias_init_with_prob(0.01)


def _build(name: str, **backbone) -> nn.Module:
    init_default_scope('mmdet')
    cfg = Config.fromfile(str(TINY / f'{name}.py')).model
    cfg.backbone.update(backbone)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


@pytest.fixture(scope='module')
def retinanet() -> nn.Module:
    return _build('tiny_retinanet_voc')


# -------------------------------------------------------------------------------- the table
def test_retinanet_predictors_and_focal_prior(retinanet):
    names = default_predictors(retinanet)
    assert names == ['bbox_head.retina_cls', 'bbox_head.retina_reg']
    with torch.no_grad():  # as if loaded from a checkpoint: the prior must not come from these
        retinanet.bbox_head.retina_cls.bias.fill_(7.0)
    priors = predictor_priors(retinanet, names)
    assert list(priors) == ['bbox_head.retina_cls']
    assert torch.allclose(priors['bbox_head.retina_cls'], torch.full((20 * 9, ), PRIOR))
    rng = torch.get_rng_state()
    zero_init_predictors(retinanet, names, priors)
    assert torch.equal(rng, torch.get_rng_state())  # the re-init of the copy kept the global RNG
    head = retinanet.bbox_head
    assert not head.retina_cls.weight.any() and not head.retina_reg.weight.any()
    assert torch.allclose(head.retina_cls.bias, torch.tensor(PRIOR))
    assert not head.retina_reg.bias.any()


def test_mask_rcnn_predictors_leave_the_rpn_alone():
    model = _build('tiny_mask-rcnn_cityscapes')
    assert default_predictors(model) == [
        'roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg', 'roi_head.mask_head.conv_logits']
    assert predictor_priors(model, default_predictors(model)) == {}  # softmax heads: bias 0


def test_wrappers_are_seen_through_and_teachers_skipped(retinanet):
    init_default_scope('mmdet')
    wrapped = DAFTModel(model=Config.fromfile(str(TINY / 'tiny_retinanet_voc.py')).model)
    assert wrapped.predictors == ('bbox_head.retina_cls', 'bbox_head.retina_reg')
    assert default_predictors(wrapped) == ['model.bbox_head.retina_cls',
                                           'model.bbox_head.retina_reg']
    semi = nn.Module()  # the SemiBaseDetector layout: student trains, teacher is its EMA
    semi.student, semi.teacher = retinanet, _build('tiny_retinanet_voc')
    assert default_predictors(semi) == ['student.bbox_head.retina_cls',
                                        'student.bbox_head.retina_reg']


def test_module_lists_and_sequentials_expand_to_their_predictors():
    head_cls = type('DeformableDETRHead', (nn.Module, ), {})  # looked up by class name
    head = head_cls()
    head.cls_branches = nn.ModuleList([nn.Linear(8, 3) for _ in range(2)])
    head.reg_branches = nn.ModuleList(
        [nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(2)])
    model = nn.Module()
    model.bbox_head = head
    assert default_predictors(model) == [
        'bbox_head.cls_branches.0', 'bbox_head.cls_branches.1', 'bbox_head.reg_branches.0.2',
        'bbox_head.reg_branches.1.2']


class MyHead(BaseModule):
    """A user's head: unknown to the table until registered."""

    def __init__(self) -> None:
        super().__init__(init_cfg=dict(type='Normal', std=0.01, bias=-2.0,
                                       override=dict(name='conv_out')))
        self.conv = nn.Conv2d(4, 4, 3)
        self.conv_out = nn.Conv2d(4, 2, 1)


def test_unknown_head_is_refused_naming_the_fix_and_can_be_added():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.decode_head = MyHead()
    with pytest.raises(ValueError, match=r"decode_head \(MyHead\).*predictors=\{'MyHead'"):
        default_predictors(model)
    # in the config: DAFTHook(predictors={'MyHead': ['conv_out']}) passes this as `extra`
    assert default_predictors(model, extra={'MyHead': ['conv_out']}) == ['decode_head.conv_out']
    register_head_predictors(MyHead, ['conv_out'])
    try:
        assert find_heads(model)[0].layers == ['decode_head.conv_out']
        priors = predictor_priors(model, ['decode_head.conv_out'])  # its own init_cfg's bias
        assert torch.equal(priors['decode_head.conv_out'], torch.full((2, ), -2.0))
    finally:
        del __import__('daft_mm.mm.predictors', fromlist=['_TABLE'])._TABLE['MyHead']
    assert 'MyHead' not in registered_heads()


def test_table_entry_naming_missing_layers_is_an_error():
    model = nn.Module()
    model.bbox_head = type('RetinaHead', (nn.Module, ), {})()
    model.bbox_head.cls = nn.Conv2d(4, 4, 1)
    with pytest.raises(ValueError, match=r"bbox_head \(RetinaHead.*retina_cls.*register_head"):
        default_predictors(model)


# ---------------------------------------------------------------------------- zero-init priors
def test_zero_init_priors_are_checked_before_any_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match='not among the predictors'):
        zero_init_predictors(model, ['1'], {'0': -1.0})
    with pytest.raises(ValueError, match='shape'):
        zero_init_predictors(model, ['1'], {'1': torch.zeros(3)})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert zero_init_predictors(model, ['1'], {'1': torch.tensor([-1.0, 2.0])}) == ['1']
    assert not model[1].weight.any() and model[1].bias.tolist() == [-1.0, 2.0]


# ------------------------------------------------------------------------------- BN train check
def test_bn_train_check_names_norm_eval_frozen_stages_and_requires_grad():
    model = _build('tiny_retinanet_voc', norm_eval=True, frozen_stages=1,
                   norm_cfg=dict(type='BN', requires_grad=False))
    with pytest.raises(ValueError) as info:
        require_bn_train(model, 'model.', 'DAFT')
    message = str(info.value)
    for key in ('model.backbone.norm_eval=True', 'model.backbone.frozen_stages',
                'model.backbone.norm_cfg.requires_grad'):
        assert key in message
    assert 'model.backbone.frozen_stages=-1' in message and 'norm_eval=False' in message
    # frozen_stages alone (BN trains elsewhere): still refused, the stage stays frozen
    model = _build('tiny_retinanet_voc', frozen_stages=1)
    with pytest.raises(ValueError, match=r'model\.backbone\.frozen_stages \(\d+ BN layers'):
        require_bn_train(model, 'model.', 'DAFT')
    assert model.training is True  # the check restored every mode


def test_frozen_stem_is_allowed_and_reported():
    model = _build('tiny_retinanet_voc', frozen_stages=0)
    assert require_bn_train(model, 'model.', 'DAFT') == ['backbone.bn1']
    assert require_bn_train(_build('tiny_retinanet_voc'), 'model.', 'DAFT') == []


def test_bn_with_eps_zero_is_refused_and_the_fragment_fixes_it():
    # stock NAS-FCOS: norm_cfg=dict(type='BN', requires_grad=False, eps=0)
    model = _build('tiny_retinanet_voc', norm_cfg=dict(type='BN', requires_grad=True, eps=0))
    with pytest.raises(ValueError, match=r'eps=0.*model\.backbone\.norm_cfg\.eps=1e-5'):
        require_bn_train(model, 'model.', 'DAFT')
    fragment = Config.fromfile(str(REPO / 'configs' / '_base_' / 'daft_detection.py'))
    assert fragment.daft_backbone['norm_cfg']['eps'] > 0


# -------------------------------------------------------------------------------- BN-like layers
@pytest.fixture
def process_group():
    """mmcv's MMSyncBN cannot be built without one; torn down so later Runners run undistributed."""
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_mmcv_syncbn_is_converted_not_skipped(process_group):
    from mmcv.ops import SyncBatchNorm as MMSyncBN
    assert not isinstance(MMSyncBN(4), nn.modules.batchnorm._BatchNorm)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MMSyncBN(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    batches = [torch.randn(2, 3, 8, 8) * 3 + 1 for _ in range(2)]
    assert list(find_batchnorms(model)) == ['1']
    model.eval()
    before = [model(x) for x in batches]
    report = convert_bn(model, batches)
    assert report.converted == ['1'] and not report.skipped
    assert abs(model[1].running_mean.mean().item()) > 0.1  # moved to the target statistics
    for x, y in zip(batches, before):
        assert torch.allclose(model(x), y, atol=1e-5)


class Stats(nn.Module):
    """Keeps running statistics but is not a BatchNorm (no eps, no affine parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer('running_mean', torch.zeros(4))
        self.register_buffer('running_var', torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize('layer,why', [
    (Stats(), r"Stats\): it keeps running statistics but has no \['eps'"),
    (nn.InstanceNorm2d(4, track_running_stats=True), r'InstanceNorm2d\): an InstanceNorm'),
])
def test_other_layers_with_running_statistics_are_refused_loudly(layer, why):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), layer)
    with pytest.raises(ValueError, match=why + r'.*modules=\['):
        find_batchnorms(model)
    with pytest.raises((ValueError, ConversionError)):
        convert_bn(model, [torch.randn(2, 3, 8, 8)])
    assert list(find_batchnorms(model, modules=['1'])) == ['1']  # the named way out
