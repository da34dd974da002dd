"""Convert an ImageNet / self-supervised ResNet checkpoint into an mmseg/mmdet ``ResNet`` backbone
checkpoint.

Accepted layouts (detected from the keys):
  torchvision   ``conv1.weight``, ``layer1.0.bn1.*`` ..., ``fc.*`` (e.g. ``resnet50-0676ba61.pth``;
                also wrapped as ``{'state_dict': ...}`` / ``{'model': ...}`` or under ``module.``)
  MoCo v1/v2    ``{'state_dict': {'module.encoder_q.conv1.weight', ..., 'module.encoder_q.fc.*',
                'module.encoder_k.*', 'module.queue', 'module.queue_ptr'}, 'optimizer': ...}``
                as in ``moco_v2_800ep_pretrain.pth.tar``: the query encoder is kept, the key
                encoder, the queue and the MLP head are dropped.

mmseg/mmdet's ``ResNet`` (``deep_stem=False``, what torchvision calls ResNet-v1.5) uses the
torchvision names, so the conversion is: take the backbone tensors, strip the prefix, drop the
classifier, and check the result loads *strictly* into a ``ResNet`` of the inferred depth and
widths. Nothing is renamed by guesswork: an unexpected or missing key is an error.

Usage::

    # backbone-only file, for init_cfg=dict(type='Pretrained', checkpoint=...) on the backbone
    python tools/convert_checkpoint.py moco_v2_800ep_pretrain.pth.tar pretrain/r50_mocov2.pth

    # whole-model keys (backbone.*), for load_from=... (the heads stay as initialised)
    python tools/convert_checkpoint.py resnet50-0676ba61.pth pretrain/r50_tv.pth --prefix backbone.

Then, for the stock DeepLabV3 (whose ``ResNetV1c`` has a deep stem that these weights lack)::

    python tools/train.py configs/daft_deeplabv3_cityscapes.py --cfg-options \
        model.model.pretrained=None model.model.backbone.type=ResNet \
        model.model.backbone.init_cfg.type=Pretrained \
        model.model.backbone.init_cfg.checkpoint=pretrain/r50_mocov2.pth

(``model.`` instead of ``model.model.`` for configs without the DAFTModel wrapper, e.g. the
detection ones, whose backbone already is a ``ResNet``.)
"""
from __future__ import annotations

import argparse
import os.path as osp
import re
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Tuple

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

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


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='torchvision ResNet or MoCo v1/v2 checkpoint')
    parser.add_argument('dst', help='output .pth')
    parser.add_argument('--prefix', default='',
                        help="key prefix: '' (default) for a backbone init_cfg, 'backbone.' for "
                             'load_from into a whole segmentor/detector')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing dst (default: refuse; the source itself is '
                        'never replaced)')
    return parser.parse_args(argv)


def check_output(src: str, dst: str, overwrite: bool) -> None:
    """Before any work: the output must not be the input, nor silently replace a file."""
    from daft_mm.utils import same_file
    if osp.exists(dst) and same_file(src, dst) or osp.realpath(src) == osp.realpath(dst):
        raise ValueError(f'dst {dst!r} is the source checkpoint itself: the converted weights '
                         'would replace their own input. Fix: give another output path')
    if osp.exists(dst) and not overwrite:
        raise FileExistsError(f'dst {dst!r} exists; refusing to replace it. Fix: another output '
                              'path, or --overwrite')


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    args = parse_args(argv)
    check_output(args.src, args.dst, args.overwrite)
    from daft_mm.mm.safe_load import load_checkpoint_file  # weights_only unless trusted
    from daft_mm.utils import atomic_save
    state = find_state_dict(load_checkpoint_file(args.src, map_location='cpu'))
    converted, meta = convert(state)
    meta['source'] = osp.basename(args.src)
    out = {'meta': meta, 'state_dict': OrderedDict(
        (args.prefix + k, v.clone()) for k, v in converted.items())}
    atomic_save(lambda f: torch.save(out, f), args.dst)  # a kill leaves no half-written file
    print(f'{meta["layout"]} checkpoint -> ResNet-{meta["arch"]["depth"]} backbone '
          f'({len(converted)} tensors, prefix {args.prefix!r}) in {args.dst}; dropped '
          f'{len(meta["dropped"])} keys')
    return meta


if __name__ == '__main__':
    main()
