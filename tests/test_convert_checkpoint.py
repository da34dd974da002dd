"""tools/convert_checkpoint.py on small checkpoints in the exact torchvision and MoCo v2 key
layouts: the converted weights load into mmseg models, through init_cfg and through load_from."""
from __future__ import annotations

import subprocess
import sys

import pytest

from _tools import load_tool
import torch

pytest.importorskip('mmseg')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402
from mmengine.runner.checkpoint import load_checkpoint  # noqa: E402
from mmseg.models.backbones import ResNet  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

from _mm_helpers import REPO, TINY, cpu_env  # noqa: E402

ARCH = dict(depth=18, stem_channels=16, base_channels=16)


@pytest.fixture(scope='module')
def tool():
    return load_tool('convert_checkpoint')


@pytest.fixture(scope='module')
def backbone_state():
    torch.manual_seed(0)
    net = ResNet(**ARCH)
    for m in net.modules():  # non-trivial BN statistics, as in a trained checkpoint
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _tiny_seg_model(init_checkpoint=None):
    register_all_modules()
    cfg = Config.fromfile(str(TINY / 'tiny_deeplabv3_cityscapes.py')).model
    cfg.backbone.type = 'ResNet'  # torchvision stem, not ResNetV1c's deep stem
    if init_checkpoint:
        cfg.backbone.init_cfg = dict(type='Pretrained', checkpoint=init_checkpoint)
    return MODELS.build(cfg)


def test_torchvision_layout_to_backbone_init_cfg(tool, backbone_state, tmp_path):
    src = dict(backbone_state)
    src['fc.weight'], src['fc.bias'] = torch.randn(1000, 128), torch.randn(1000)
    torch.save(src, tmp_path / 'resnet18_tv.pth')  # torchvision saves the bare state dict
    proc = subprocess.run([sys.executable, 'tools/convert_checkpoint.py',
                           str(tmp_path / 'resnet18_tv.pth'), str(tmp_path / 'out.pth')],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'torchvision checkpoint -> ResNet-18' in proc.stdout
    model = _tiny_seg_model(str(tmp_path / 'out.pth'))
    model.init_weights()
    for key, value in backbone_state.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_moco_v2_layout_to_load_from(tool, backbone_state, tmp_path):
    q = {f'module.encoder_q.{k}': v for k, v in backbone_state.items()}
    k = {f'module.encoder_k.{k}': v + 1 for k, v in backbone_state.items()}
    head = {'module.encoder_q.fc.0.weight': torch.randn(128, 128),
            'module.encoder_q.fc.0.bias': torch.randn(128),
            'module.encoder_q.fc.2.weight': torch.randn(16, 128),
            'module.encoder_q.fc.2.bias': torch.randn(16),
            'module.encoder_k.fc.0.weight': torch.randn(128, 128),
            'module.queue': torch.randn(16, 64),
            'module.queue_ptr': torch.zeros(1, dtype=torch.long)}
    ckpt = {'epoch': 800, 'arch': 'resnet18', 'state_dict': {**q, **k, **head},
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.03, 'params': [0]}]}}
    torch.save(ckpt, tmp_path / 'moco_v2_800ep_pretrain.pth.tar')
    meta = tool.main([str(tmp_path / 'moco_v2_800ep_pretrain.pth.tar'), str(tmp_path / 'out.pth'),
                      '--prefix', 'backbone.'])
    assert meta['layout'] == 'moco' and meta['arch'] == ARCH
    assert 'fc.0.weight' in meta['dropped'] and 'module.queue' in meta['dropped']
    assert any(key.startswith('module.encoder_k.') for key in meta['dropped'])
    model = _tiny_seg_model()
    head_before = model.decode_head.conv_seg.weight.clone()
    load_checkpoint(model, str(tmp_path / 'out.pth'), strict=False)  # what load_from does
    for key, value in backbone_state.items():  # the query encoder, not the key encoder
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert torch.equal(model.decode_head.conv_seg.weight, head_before)


def test_truncated_checkpoint_is_refused(backbone_state):
    from daft_mm.mm import checkpoint_convert as tool
    state = {k: v for k, v in backbone_state.items() if not k.startswith('layer4.1.')}
    with pytest.raises(ValueError, match=r'\[2, 2, 2, 1\].*truncated'):
        tool.convert(state)
    state = {k: v for k, v in backbone_state.items() if k != 'layer4.1.bn2.running_var'}
    with pytest.raises(ValueError, match=r"missing \['layer4\.1\.bn2\.running_var'\]"):
        tool.convert(state)
    state = dict(backbone_state, **{'layer1.0.extra.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \['layer1\.0\.extra\.weight'\]"):
        tool.convert(state)
    with pytest.raises(ValueError, match='unknown layout'):
        tool.convert({'stem.0.weight': torch.zeros(1)})
