"""What does reading a repeated training set once save in DAFT's statistics pass?

The stock Cityscapes detection configs train on ``RepeatDataset(times=8)``; the statistics pass
used to walk it 8 times for the same mean and variance. This times the pass (``prepare`` on the
model the config builds, after init) of the tiny Mask R-CNN Cityscapes twin
(``configs/_tiny_/tiny_daft_mask-rcnn_cityscapes.py``) with its training set wrapped back in the
stock ``RepeatDataset(times=8)``, on generated images: once reading each image once (now), once
reading the repeats (as before, by leaving the wrapper in place). Same process, same data.

    python benchmarks/bench_stats_pass_repeat.py --out benchmarks/results/stats_pass_repeat.json
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIG = REPO / 'configs' / '_tiny_' / 'tiny_daft_mask-rcnn_cityscapes.py'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', type=int, default=8, help='generated training images')
    parser.add_argument('--times', type=int, default=8, help='the RepeatDataset factor')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--out', type=Path, help='also write the figures as JSON')
    args = parser.parse_args()

    import torch
    torch.set_num_threads(1)
    import daft_mm.mm  # noqa: F401
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.runner import Runner

    from daft_mm.mm import preparation
    from daft_mm.mm.cli import load_config
    from daft_mm.mm.datasets import make_cityscapes
    from daft_mm.core import prepare
    from daft_mm.mm.plan import decide_plan

    with tempfile.TemporaryDirectory() as tmp:
        make_cityscapes(tmp, num_train=args.images, num_val=1, seed=0, instances=True)
        cfg = load_config(str(CONFIG), {'data_root': tmp}, work_dir=tmp)
        cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=args.times,
                                            dataset=cfg.train_dataloader.dataset)
        with DefaultScope.overwrite_default_scope('mmdet'):
            model = MODELS.build(cfg.model)
            backbone = Path(tmp) / 'backbone.pth'  # the model's own init stands in for ImageNet
            inner = getattr(model, 'model', model)
            torch.save({'state_dict': inner.backbone.state_dict()}, backbone)
            inner.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(backbone))
            model.init_weights()
            train = Runner.build_dataloader(cfg.train_dataloader, seed=0)
        net = getattr(model, 'model', model)
        plan = decide_plan(cfg, model).core()
        times = {}
        for name, unwrap in (('each image once (now)', preparation.unrepeated),
                             ('the repeats too (before)', lambda dataset: dataset)):
            rounds = []
            with mock.patch.object(preparation, 'unrepeated', unwrap):
                for _ in range(args.repeats):
                    loader = preparation.one_pass_loader(train, seed=0)
                    copy_ = copy.deepcopy(net)
                    start = time.perf_counter()
                    done = prepare(copy_, loader, plan,
                                   forward=preparation.mm_forward('loss'))
                    rounds.append(time.perf_counter() - start)
            images = done.report.layers[0].num_samples
            times[name] = dict(median_s=round(statistics.median(rounds), 3),
                               images_read=images, batches=done.report.num_batches,
                               rounds_s=[round(r, 3) for r in rounds])
            print(f'{name:>26}: {times[name]["median_s"]:6.2f} s median of {args.repeats} '
                  f'({images} images read, {done.report.num_batches} batches)', flush=True)
    before = times['the repeats too (before)']['median_s']
    now = times['each image once (now)']['median_s']
    print(f'statistics pass of the tiny Mask R-CNN twin, RepeatDataset(times={args.times}) over '
          f'{args.images} images: {before:.2f} s -> {now:.2f} s ({before / now:.1f}x)')
    if args.out:
        import json
        import os

        from daft_mm.benchmark.data import repo_commit
        args.out.write_text(json.dumps(dict(
            config=str(CONFIG.relative_to(REPO)), times=args.times, images=args.images,
            data='generated: daft_mm.mm.datasets.make_cityscapes(num_train=images, seed=0, '
                 'instances=True)', results=times, code_commit=repo_commit(),
            machine=dict(cpus=os.cpu_count(), torch_threads=1),
            date=time.strftime('%Y-%m-%d')), indent=1) + '\n')
        print(f'written to {args.out}')


if __name__ == '__main__':
    main()
