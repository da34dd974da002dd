"""Pretrain the benchmark's backbone as an image classifier on real photographs (Imagenette: the
stand-in for ImageNet, which cannot be downloaded here) and save it backbone-only with its
provenance; daft_mm/benchmark/imagenette.py says how.

    # Imagenette in its usual layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG
    python tools/pretrain_backbone.py --train data/imagenette/train --val data/imagenette/val \\
        --out benchmarks/pretrained/imagenette_resnetv1c18w16_64px.pth
    python tools/pretrain_backbone.py ... --iters 20 --image-size 32   # seconds, a smoke test

The backbone is the one of --config (default: the demo's, configs/demo/ft_demo.py). The checkpoint
loads as ``model.backbone.init_cfg=dict(type='Pretrained', checkpoint=OUT, prefix='backbone.')``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from daft_mm.benchmark.imagenette import PretrainSettings, pretrain_backbone  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--train', type=Path, required=True, help='train/<class>/<image>')
    p.add_argument('--val', type=Path, required=True, help='val/<class>/<image>')
    p.add_argument('--out', type=Path, required=True, help='the backbone checkpoint to write')
    p.add_argument('--config', type=Path, default=REPO / 'configs' / 'demo' / 'ft_demo.py',
                   help='the segmentation config whose backbone to pretrain')
    p.add_argument('--cache-dir', type=Path, default=REPO / 'work_dirs' / 'imagenette_cache',
                   help='decoded images, reused while the files and the size are the same')
    defaults = PretrainSettings()
    for f in fields(PretrainSettings):
        p.add_argument(f'--{f.name.replace("_", "-")}', type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import warnings
    warnings.filterwarnings('ignore')
    args = parse_args(argv)
    from mmengine.config import Config
    cfg = Config.fromfile(str(args.config)).model
    backbone = (cfg.get('model') or cfg)['backbone'].to_dict()
    settings = PretrainSettings(**{f.name: getattr(args, f.name) for f in fields(PretrainSettings)})
    provenance = pretrain_backbone(backbone, args.train, args.val, args.out, settings,
                                   cache_dir=args.cache_dir)
    print(json.dumps({k: provenance[k] for k in ('val_top1', 'chance_top1', 'seconds')}))
    return provenance


if __name__ == '__main__':
    main()
