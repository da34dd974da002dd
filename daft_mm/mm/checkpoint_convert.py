"""ImageNet / self-supervised ResNet checkpoints (torchvision, MoCo) as mmseg / mmdet ``ResNet``
backbone state dicts: detect the layout from the keys, strip its prefix, drop the classifier, and
check the result loads *strictly* into a ``ResNet`` of the inferred depth and widths. Nothing is
renamed by guesswork. ``tools/convert_checkpoint.py`` is the command line.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Tuple

import torch

__all__ = ['find_state_dict', 'strip_layout', 'infer_arch', 'build_backbone', 'convert']


#: (blocks per stage, bottleneck) -> depth, the ResNet variants mmseg/mmdet build
_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
           ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
#: key prefixes of known layouts, most specific first
_LAYOUTS = (('module.encoder_q.', 'moco'), ('encoder_q.', 'moco'), ('module.', 'torchvision-ddp'),
            ('', 'torchvision'))


def find_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint object (raw, ``state_dict`` or ``model`` entry)."""
    if isinstance(obj, Mapping):
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), Mapping):
                return dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError('no state dict found: expected a dict of tensors, or one under '
                     "'state_dict' or 'model'")


def strip_layout(state: Mapping[str, torch.Tensor]) -> Tuple[str, Dict[str, torch.Tensor],
                                                              List[str]]:
    """(layout name, backbone-candidate tensors without prefix, keys outside the prefix)."""
    for prefix, layout in _LAYOUTS:
        if prefix and any(k.startswith(prefix + 'conv1.') for k in state):
            kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return layout, kept, sorted(k for k in state if not k.startswith(prefix))
        if not prefix and 'conv1.weight' in state:
            return layout, dict(state), []
    raise ValueError('unknown layout: no conv1.weight under any of the prefixes '
                     f'{[p for p, _ in _LAYOUTS if p]} or at the top level; is this a '
                     'torchvision-style ResNet (not a deep-stem ResNetV1c/V1d)?')


def infer_arch(state: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """depth, stem_channels and base_channels of the ResNet the keys describe."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf'layer{stage}\.(\d+)\.', k))}
        blocks.append(len(ids))
    bottleneck = 'layer1.0.conv3.weight' in state
    depth = _DEPTHS.get((tuple(blocks), bottleneck))
    if depth is None:
        raise ValueError(f'blocks per stage {blocks} (bottleneck={bottleneck}) match no ResNet '
                         'depth of 18/34/50/101/152; the checkpoint is truncated or not a ResNet')
    return dict(depth=depth, stem_channels=int(state['conv1.weight'].shape[0]),
                base_channels=int(state['layer1.0.conv1.weight'].shape[0]))


def build_backbone(arch: Mapping[str, int]) -> torch.nn.Module:
    """An mmseg (else mmdet) ``ResNet`` with these sizes: the key/shape reference."""
    try:
        from mmseg.models.backbones import ResNet
    except ImportError:
        from mmdet.models.backbones import ResNet
    return ResNet(**arch)


def convert(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(backbone state dict, meta) from any accepted layout; checked strictly against ResNet."""
    layout, candidates, outside = strip_layout(state)
    arch = infer_arch(candidates)
    reference = build_backbone(arch).state_dict()
    converted = OrderedDict((k, candidates[k]) for k in reference if k in candidates)
    missing = [k for k in reference if k not in candidates]
    dropped = sorted(set(candidates) - set(reference)) + outside
    unexpected = [k for k in dropped if not _droppable(k, layout)]
    if missing or unexpected:
        raise ValueError(
            f'{layout} checkpoint does not map onto ResNet-{arch["depth"]}: missing '
            f'{missing[:8]}{" ..." if len(missing) > 8 else ""}, unexpected '
            f'{unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}. Only the classifier '
            '(fc.*) and, for MoCo, encoder_k / queue are dropped.')
    bad_shapes = [k for k, v in converted.items() if tuple(v.shape) != tuple(reference[k].shape)]
    if bad_shapes:
        raise ValueError(f'shape mismatch against ResNet-{arch["depth"]}: {bad_shapes[:8]}')
    meta = dict(layout=layout, arch=arch, dropped=dropped)
    return converted, meta


def _droppable(key: str, layout: str) -> bool:
    if key.startswith('fc.'):
        return True  # torchvision classifier / MoCo v2 MLP head
    return layout == 'moco' and bool(re.match(r'(module\.)?(encoder_k\.|queue)', key))
