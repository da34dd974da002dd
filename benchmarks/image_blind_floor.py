"""The image-blind floor of a comparison task, on its own: no method is trained. For a study whose
report was made without the floor (its code predates the detection floor): the file this
writes is added to the published report by ``publish_report.py --floor``.

    python benchmarks/image_blind_floor.py \\
        configs/camvid/compare_camvid_boxes_day_dusk_faster-rcnn.py \\
        benchmarks/results/camvid_boxes_floor.json --cfg-options data_root=data/CamVid
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: Optional[Sequence[str]] = None) -> None:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='the comparison task config (its compare dict)')
    p.add_argument('out', help='the json to write')
    p.add_argument('--max-images', type=int, default=None,
                   help='the first N images of every set, as the report\'s task had them '
                   '(tools/compare.py --quick)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    args = p.parse_args(argv)

    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401  (ImageCorruption, the dataset types)
    from daft_mm.benchmark.prior import evaluate_prior
    from daft_mm.benchmark.runs import Context, load_pretrained, load_run_config
    from daft_mm.benchmark.scoring import SCOPES
    from daft_mm.benchmark.task import provenance, task_from_config
    from publish_report import portable

    task = task_from_config(args.config, options=dict(args.cfg_options),
                            max_images=args.max_images)
    init_default_scope(SCOPES[task.kind])
    start = time.time()
    with tempfile.TemporaryDirectory() as work:
        ctx = Context(task=task, work_dir=Path(work), step=lambda _: None)
        load_pretrained(ctx)  # the evaluation sets and the metric, as every run has them
        train = load_run_config(ctx, Path(work) / 'unused', 1, {}).train_dataloader.dataset
        floor = evaluate_prior(ctx, train)
        floor.pop('counts', None)  # segmentation's per-image counts: the report's, not needed
        record = dict(floor, task_name=task.name, task_max_images=task.max_images,
                      kind=task.kind, config=args.config, ood_sets=task.ood_names,
                      provenance=provenance(task), seconds=time.time() - start)
        record = portable(record, Path(work))  # no path of this machine in a published file
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + '\n')
    print(f'{floor["method"]} on {task.name}: ID-val {floor["id_val"]:.2f}, ID '
          f'{floor["id"]:.2f}, ' + ', '.join(f'{k} {v:.2f}' for k, v in floor['ood'].items())
          + f' (OOD mean {floor["ood_mean"]:.2f}); {out}')


if __name__ == '__main__':
    main()
