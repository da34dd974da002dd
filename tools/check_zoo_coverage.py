"""Does DAFT work out of the box on the stock model zoo? One config per folder, checked end to end.

For every folder of the installed mmseg / mmdet ``.mim/configs`` that has a config with a
BatchNorm ResNet-family backbone (ResNet, ResNetV1c/d, ResNeXt, ResNeSt), one such config is built
with a *small ResNet* (one block per stage, same widths, so every neck and head fits unchanged),
nothing downloaded, and the DAFT fragment applied (detection: ``configs/_base_/daft_detection.py``'s
``daft_backbone``; segmentation: ``configs/_base_/daft.py`` needs none). Then, on two random
batches (64x64 images, larger where a stock setting needs it: ``IMG_FOR``; video models get
two-frame clips, semi-supervised ones the same images in every branch):

1. **predictors**: the head table (:mod:`daft_mm.mm.predictors`) finds the final predictors and
   every one is a predictor leaf;
2. **BN train**: no BatchNorm is kept from training (``norm_eval``, ``frozen_stages``,
   ``requires_grad=False``: :func:`daft_mm.mm.models.daft_model.require_bn_train`);
3. **conversion**: :func:`daft_mm.core.convert_bn` reaches and converts every BN-like layer
   (mmcv's MMSyncBN included) and the eval-mode function is preserved (max abs difference of
   every output in ``tensor`` mode, or of the losses where that mode does not exist, relative to
   max(1, |output|), <= 1e-4). Where float32 misses that, the check is redone in float64 on a
   copy: the conversion is exact in real arithmetic, but a discontinuous step in the eval path
   (SOLO's exact local-maximum test, DINO's top-k query selection) can turn its float32
   rounding into a visible change; in float64 the rounding is 1e-16 and a real error stays.
   This check takes every BN layer, so that every layer type is proven convertible; a DAFT run
   converts only the BN layers of what was pretrained (:func:`daft_mm.core.split_batchnorms`):
   the table's "DAFT converts / leaves new" column gives that split for the stock config's
   pretrained modules (its ``init_cfg`` Pretrained / ``pretrained``);
4. **priors**: after DAFT's zero-init every predictor has weight 0 and, where the model's own
   ``init_weights`` gives its bias a constant non-zero value (focal / sigmoid classifiers, ...),
   exactly that bias;
5. **train step**: one SGD step in train mode runs and gives finite losses (a model whose ops
   need CUDA is reported, not failed).

Prints the coverage table (markdown) and writes ``--json``. A folder whose model DAFT cannot take
is listed with the error (which names the fix).

    python tools/check_zoo_coverage.py                              # the whole zoo, ~10 min
    python tools/check_zoo_coverage.py --folders mmdet/retinanet mmseg/danet --json out.json
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
import warnings
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from daft_mm.mm.zoo import (FolderResult, check_folder, folders,  # noqa: E402
                            single_process_group)


# ------------------------------------------------------------------------------------ report
def table(results: Sequence[FolderResult]) -> str:
    lines = ['| folder | config | status | predictors | priors | BN conv. | DAFT converts / leaves '
             'new | max diff | note |', '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        if r.status == 'skipped':
            continue
        preds = _compact(r.predictors)
        priors = ', '.join(sorted({f'{v:g}' for v in r.priors.values()})) or '—'
        diff = '—' if r.function_diff is None else f'{r.function_diff:.1e}'
        if r.function_diff_float32 is not None:
            diff = f'{diff} (float64; float32: {r.function_diff_float32:.1e})'
        conv = f'{r.converted}/{r.bn_layers}' if r.bn_layers else '—'
        rule = (f'{len(r.rule_converted)} ({", ".join(r.pretrained) or "nothing pretrained"}) / '
                f'{len(r.rule_left_new)}' if r.bn_layers else '—')
        note = r.note or r.train_step
        if r.refusal:
            note = f'refused as shipped ({_short_refusal(r.refusal)}); with that fix: ' + note
        if r.stays_frozen:
            note = f'stem frozen ({len(r.stays_frozen)} BN); ' + note
        lines.append(f'| {r.folder} | {r.config} | {r.status} | {preds} | {priors} | {conv} | '
                     f'{rule} | {diff} | {note} |')
    return '\n'.join(lines)


def _short_refusal(message: str) -> str:
    import re
    keys = sorted(set(re.findall(r'model\.[\w.]*?(norm_eval|frozen_stages|requires_grad)',
                                 message)))
    return ', '.join(keys) or message[:80]


def _compact(names: Sequence[str]) -> str:
    """``roi_head.bbox_head.0.fc_cls`` x3 -> ``roi_head.bbox_head.{0,1,2}.fc_cls``."""
    import re
    groups: Dict[str, List[str]] = {}
    for name in names:
        key = re.sub(r'\.(\d+)\.', '.{i}.', name)
        key = re.sub(r'\.(\d+)$', '.{i}', key)
        groups.setdefault(key, []).append(name)
    return ', '.join(k if len(v) > 1 or '{i}' not in k else v[0] for k, v in groups.items())


def summary(results: Sequence[FolderResult]) -> str:
    lines = []
    for package in ('mmseg', 'mmdet'):
        rows = [r for r in results if r.folder.startswith(package)
                and r.status not in ('skipped', 'not buildable here')]
        if rows:
            ok = sum(r.status == 'ok' for r in rows)
            fixed = sum(r.status == 'fix named' for r in rows)
            refused = sum(r.status == 'refused' for r in rows)
            gpu = sum(r.status == 'needs GPU' for r in rows)
            pkg = sum(r.status == 'needs package' for r in rows)
            lines.append(f'{package}: {ok}/{len(rows)} work out of the box, {fixed} refused at '
                         f'start-up naming the fix (and work with it), {refused} refused, '
                         f'{gpu} need a GPU op, {pkg} an optional package not installed here '
                         f'(checked up to it), {len(rows) - ok - fixed - refused - gpu - pkg} fail')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--folders', nargs='*', help='package/folder, e.g. mmdet/retinanet '
                        '(default: every folder of both packages)')
    parser.add_argument('--json', help='write the results here')
    parser.add_argument('--no-train-step', action='store_true')
    parser.add_argument('--static', action='store_true',
                        help='predictors, BN train and priors only: no conversion, no training')
    parser.add_argument('--jsonl', help='append each result to this file as it is done')
    args = parser.parse_args(argv)
    warnings.filterwarnings('ignore')
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    import daft_mm.mm  # noqa: F401 - registers DAFTModel & co.
    single_process_group()
    todo = [tuple(f.split('/', 1)) for f in args.folders] if args.folders else [
        (p, f) for p in ('mmseg', 'mmdet') for f in folders(p)]
    results = []
    for package, folder in todo:
        result = check_folder(package, folder, train_step=not args.no_train_step,
                              static=args.static)
        results.append(result)
        if args.jsonl:
            with open(args.jsonl, 'a') as f:
                f.write(json.dumps(asdict(result)) + '\n')
        if result.status != 'skipped':
            print(f'{result.folder:<28} {result.status:<8} {result.seconds:>5}s '
                  f'{result.note or result.train_step}', file=sys.stderr, flush=True)
    print(table(results))
    print()
    print(summary(results))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0 if all(r.status in ('ok', 'fix named', 'refused', 'needs GPU', 'needs package',
                                 'skipped', 'not buildable here')
                    for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
