"""How much did fine-tuning distort the pretrained backbone? Offline comparison of checkpoints.

For every fine-tuned checkpoint, against the pretrained backbone (and, for DAFT runs, against the
model right after BN conversion, the like-with-like start of a DAFT run):

* feature similarity on a dataset split: cosine and L2 of globally pooled backbone features per
  image, cosine per pixel (dense models);
* per-layer relative parameter change ``||theta - theta0|| / ||theta0||`` for conv weights and
  BN weights, biases, running means and running vars, along the network with stage labels.

Writes ``feature_similarity.png``, ``parameter_change.png`` and ``distortion.json`` (every number,
each labelled with its reference) to ``--out-dir`` and prints a short summary.

Example::

    python tools/analyze_distortion.py configs/daft_deeplabv3_cityscapes.py \\
        --pretrained work_dirs/pretrained.pth \\
        --finetuned plain=work_dirs/plain/iter_20000.pth daft=work_dirs/daft/iter_20000.pth \\
        --reference-converted daft=work_dirs/daft/converted.pth   # or: --convert daft
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from daft_mm.mm.distortion import CONVERTED, PRETRAINED  # noqa: E402
from daft_mm.mm.distortion_report import (analysis_inputs, default_out_dir,  # noqa: E402
                                          format_summary, plot_features, plot_parameters,
                                          refuse_other_analysis)


# ------------------------------------------------------------------------------------ args
def _name_path(text: str) -> Tuple[str, str]:
    name, sep, path = text.partition('=')
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f'expected NAME=CHECKPOINT, got {text!r}')
    if name in (PRETRAINED, CONVERTED):
        raise argparse.ArgumentTypeError(f'run name {name!r} is reserved for a reference')
    return name, path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmseg/mmdet config that builds the model and dataloaders')
    parser.add_argument('--pretrained', required=True,
                        help='reference checkpoint: a whole model or a bare backbone')
    parser.add_argument('--finetuned', required=True, nargs='+', type=_name_path,
                        metavar='NAME=CKPT', help='fine-tuned checkpoints to compare')
    parser.add_argument('--reference-converted', nargs='+', type=_name_path, default=[],
                        metavar='NAME=CKPT',
                        help='for run NAME, also compare against this checkpoint of the model '
                        'right after BN conversion: <work_dir>/converted.pth, which DAFTHook '
                        'saves when it has converted (save_converted=True, the default)')
    parser.add_argument('--convert', nargs='+', default=[], metavar='NAME',
                        help='for run NAME, also compare against the pretrained model converted '
                        'here with daft_mm.core.convert_bn on --convert-split')
    parser.add_argument('--convert-split', default='train', choices=('train', 'val', 'test'))
    parser.add_argument('--convert-batches', type=int, default=None,
                        help='at most this many batches for --convert (default: one pass over '
                        'the split, as DAFTHook)')
    parser.add_argument('--convert-var-mode', default='batch', choices=('batch', 'population'))
    parser.add_argument('--split', default='val', choices=('train', 'val', 'test'),
                        help="split whose dataloader feeds the feature comparison (default val)")
    parser.add_argument('--max-images', type=int, default=None, help='images to compare on')
    parser.add_argument('--levels', type=int, nargs='+', default=[-1],
                        help='backbone outputs to compare (default -1: the deepest)')
    parser.add_argument('--num-workers', type=int, default=0, help='dataloader workers')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', type=int, default=0, help='seed for the conversion dataloader')
    parser.add_argument('--out-dir', default=None,
                        help='default work_dirs/distortion/<config name>/<run names>-<digest of '
                        'the inputs>: each analysis its own folder')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an analysis of other inputs in --out-dir (without it, '
                        'that is an error; the same inputs again always replace it)')
    parser.add_argument('--cfg-options', nargs='+', default=None, metavar='KEY=VALUE',
                        help='override config settings, as in tools/train.py')
    args = parser.parse_args(argv)

    names = [name for name, _ in args.finetuned]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        parser.error(f'run names must be unique, repeated: {sorted(dup)}')
    for flag, given in (('--reference-converted', [n for n, _ in args.reference_converted]),
                        ('--convert', args.convert)):
        unknown = [n for n in given if n not in names]
        if unknown:
            parser.error(f'{flag} names unknown run(s) {unknown}; runs are {names}')
    both = set(args.convert) & {n for n, _ in args.reference_converted}
    if both:
        parser.error(f'runs {sorted(both)} have both --reference-converted and --convert')
    if args.max_images is not None and args.max_images < 1:
        parser.error('--max-images must be positive')
    return args


# ------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    from mmengine.config import Config

    from daft_mm.mm.cli import apply_cfg_options
    from daft_mm.mm.distortion import analyze_distortion

    cfg = Config.fromfile(args.config)
    # The tools' shared way: data_root=PATH reaches every dataloader (tools/train.py, test.py,
    # test_robustness.py do the same).
    used = {f'{args.split}_dataloader'} | ({f'{args.convert_split}_dataloader'}
                                           if args.convert else set())
    apply_cfg_options(cfg, _parse_cfg_options(args.cfg_options or []), sorted(used))
    inputs = analysis_inputs(args, cfg)
    out_dir = args.out_dir or default_out_dir(args, inputs)
    refuse_other_analysis(out_dir, inputs, args.overwrite)
    result = analyze_distortion(
        cfg, args.pretrained, args.finetuned, reference_converted=args.reference_converted,
        convert=args.convert, split=args.split, max_images=args.max_images, levels=args.levels,
        device=args.device, num_workers=args.num_workers, seed=args.seed,
        convert_split=args.convert_split, convert_batches=args.convert_batches,
        convert_var_mode=args.convert_var_mode)
    result['inputs'] = inputs

    from daft_mm.utils import atomic_write_json
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(osp.join(out_dir, 'distortion.json'), result, indent=1)
    plot_features(result, osp.join(out_dir, 'feature_similarity.png'))
    plot_parameters(result, osp.join(out_dir, 'parameter_change.png'))
    print(format_summary(result))
    print(f'wrote {out_dir}/distortion.json, feature_similarity.png, parameter_change.png')
    return result


def _parse_cfg_options(items: Sequence[str]) -> Dict[str, Any]:
    """KEY=VALUE overrides parsed the way mmengine's DictAction parses them."""
    from mmengine.config import DictAction

    options: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep:
            raise SystemExit(f'--cfg-options expects KEY=VALUE, got {item!r}')
        options[key] = DictAction._parse_iterable(value)
    return options


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as exc:
        # KeyError's str() adds quotes around the message; the others print as they are.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        sys.exit(f'analyze_distortion: error: {message}')
