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
import sys
from collections import OrderedDict
from typing import Any, Dict, List

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from daft_mm.mm.checkpoint_convert import convert, find_state_dict  # noqa: E402


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
