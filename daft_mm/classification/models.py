"""A configurable ResNet whose parameter names follow torchvision's ``resnet*`` layout.

torchvision does not import with this torch, yet pretrained ResNet checkpoints come in its
layout, so this module rebuilds the same module tree (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ..., ``fc``) and loads such state dicts as they are. Two knobs
that torchvision lacks keep tests and demos small: ``base_width`` and ``small_input``
(a 3x3 stride-1 stem without max-pool, for 32x32 images); neither changes any key name. A third,
``deep_stem``, builds ResNetV1c's three-conv stem (``stem.0`` ... ``stem.8``, mmseg / mmdet's
names; the blocks are named alike), so a backbone pretrained for the OpenMMLab configs
(``tools/pretrain_backbone.py``) loads into a classifier too.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ['BasicBlock', 'Bottleneck', 'ResNet', 'ARCHS', 'build_resnet', 'has_deep_stem',
           'load_torchvision_state_dict', 'CheckpointLoad']


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as in torchvision's "v1.5"), 1x1 expand."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet classifier with a single linear predictor ``fc`` (DAFT's zero-init target)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int = 1000, *, base_width: int = 64, small_input: bool = False,
                 deep_stem: bool = False, zero_init_residual: bool = False) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f'layers must be four positive block counts, got {layers!r}')
        self.deep_stem = deep_stem
        if deep_stem:  # ResNetV1c's three 3x3 convs, as mmseg / mmdet name them (stem.0 ... 8)
            half = base_width // 2
            convs = [(3, half, 1 if small_input else 2), (half, half, 1), (half, base_width, 1)]
            self.stem = nn.Sequential(*[layer for cin, cout, stride in convs for layer in (
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True))])
        elif small_input:
            self.conv1 = nn.Conv2d(3, base_width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.maxpool: nn.Module = (nn.Identity() if small_input
                                   else nn.MaxPool2d(3, stride=2, padding=1))
        if not deep_stem:
            self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        in_ch = base_width
        for index, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2)), start=1):
            stage, in_ch = self._make_stage(block, in_ch, base_width * 2 ** (index - 1),
                                            blocks, stride)
            setattr(self, f'layer{index}', stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        self._init_weights(zero_init_residual)

    @staticmethod
    def _make_stage(block: type[BasicBlock] | type[Bottleneck], in_ch: int, width: int,
                    blocks: int, stride: int) -> tuple[nn.Sequential, int]:
        out_ch = width * block.expansion
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        modules = [block(in_ch, width, stride, downsample)]
        modules += [block(out_ch, width) for _ in range(blocks - 1)]
        return nn.Sequential(*modules), out_ch

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:  # each block starts as the identity
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features: what the head sees (used to measure distortion)."""
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


#: name -> (block, blocks per stage); the torchvision depths plus a tiny one for tests.
ARCHS: Mapping[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    'resnet10': (BasicBlock, (1, 1, 1, 1)),
    'resnet18': (BasicBlock, (2, 2, 2, 2)),
    'resnet34': (BasicBlock, (3, 4, 6, 3)),
    'resnet50': (Bottleneck, (3, 4, 6, 3)),
    'resnet101': (Bottleneck, (3, 4, 23, 3)),
    'resnet152': (Bottleneck, (3, 8, 36, 3)),
}


def build_resnet(arch: str, num_classes: int, **kwargs: object) -> ResNet:
    """``build_resnet('resnet50', 10)``; ``kwargs`` go to :class:`ResNet`."""
    if arch not in ARCHS:
        raise KeyError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
    block, layers = ARCHS[arch]
    return ResNet(block, layers, num_classes, **kwargs)  # type: ignore[arg-type]


@dataclass
class CheckpointLoad:
    """What loading a checkpoint did, for logs and result files."""

    path: str
    loaded: int
    dropped_head: list[str] = field(default_factory=list)  # keys left at the model's init


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    # Accept the common wrappers: {'state_dict': ...} (mmengine), {'model': ...}, and the
    # 'module.' prefix DistributedDataParallel adds.
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ('state_dict', 'model'):
            if key in obj:
                obj = obj[key]
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise TypeError(f'checkpoint holds a {type(obj).__name__}, not a state dict')
    state = dict(obj)
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def load_torchvision_state_dict(model: nn.Module, checkpoint: str | os.PathLike | Mapping,
                                *, head: str = 'fc', source: str | None = None
                                ) -> CheckpointLoad:
    """Load a torchvision-layout ResNet state dict into ``model``.

    Every backbone key must match in name and shape (strict), so a wrong depth or
    width fails loudly. Head keys whose shapes differ (1000 ImageNet classes vs the
    target's) are dropped and the model's own head kept: fine-tuning replaces it anyway.
    ``source``: the file a ``checkpoint`` given as a loaded dict was read from.
    """
    if isinstance(checkpoint, Mapping):
        path, raw = source or '<state dict>', checkpoint
    else:
        path = os.fspath(checkpoint)
        raw = torch.load(path, map_location='cpu', weights_only=True)
    state = _unwrap_state_dict(raw)
    if state and all(k.startswith('backbone.') for k in state):  # an OpenMMLab backbone file
        state = {k[len('backbone.'):]: v for k, v in state.items()}
    deep = any(k.startswith('stem.') for k in state)
    if deep != bool(getattr(model, 'deep_stem', False)):
        raise ValueError(
            f'{path} holds a ' + ('deep stem (`stem.*`: mmseg / mmdet ResNetV1c, as '
                                  'tools/pretrain_backbone.py writes it)' if deep else
                                  'single-conv stem (`conv1`)')
            + ' but the model was built with the other one. Fix: build it with '
            f'deep_stem={deep} (tools/train_cls.py picks it from the checkpoint)')
    own = model.state_dict()
    dropped = [k for k in state if (k == head or k.startswith(head + '.')) and k in own
               and state[k].shape != own[k].shape]
    for key in dropped:
        state.pop(key)
        state[key] = own[key]
    mismatched = [f'{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}'
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f'{path}: shapes differ from the model: {mismatched[:5]}')
    result = model.load_state_dict(state, strict=False)
    new_head = [k for k in result.missing_keys if k == head or k.startswith(head + '.')]
    if new_head and len(new_head) == len(result.missing_keys):  # a backbone-only checkpoint
        result = result._replace(missing_keys=[])
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f'{path}: not this ResNet layout; missing {result.missing_keys[:5]}, '
                         f'unexpected {result.unexpected_keys[:5]}')
    return CheckpointLoad(path, loaded=len(state) - len(dropped),
                          dropped_head=dropped + new_head)


def has_deep_stem(checkpoint: Mapping) -> bool:
    """Whether a loaded checkpoint holds a ResNetV1c deep stem (``stem.*``, under ``backbone.``
    or not), as ``tools/pretrain_backbone.py`` writes it: build the model with
    ``deep_stem=True``."""
    return any(k.startswith(('stem.', 'backbone.stem.')) for k in _unwrap_state_dict(checkpoint))
