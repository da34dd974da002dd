"""Evaluate a segmentor (mIoU) or detector (mAP) under the common corruptions at severities 1-5.

The benchmark of Hendrycks & Dietterich (ImageNet-C), as used for COCO-C / Cityscapes-C and by
mmdet's robustness tool: the test set is evaluated clean, then once per corruption and severity with
``ImageCorruption`` inserted right after the image is loaded. Reported, as in that literature:

* ``P``: the clean metric;
* ``mPC``: mean performance under corruption (mean over the corruptions and severities run);
* ``rPC``: relative performance under corruption, ``mPC / P`` (in %).

Writes ``robustness.json`` (every number, updated after each evaluation so ``--resume`` can skip
what is done), ``robustness.md`` (table) and ``robustness.png`` (metric vs severity) into the work
dir, each atomically (a kill leaves the previous file whole). The JSON records what its numbers
depend on (the config with its --cfg-options, the checkpoint's bytes, the metric, the seed):
``--resume`` refuses to mix results of another run into it, and an existing result of another run
is never overwritten without ``--overwrite``. E.g.::

    python tools/test_robustness.py configs/ood/acdc_fog.py work_dirs/daft/iter_40000.pth \
        --corruptions noise blur --severities 1 3 5
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import os.path as osp
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mmengine.config import DictAction

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

#: Metric keys tried in order when --metric is not given.
_SEG_KEYS = ('mIoU', )
_DET_KEYS = ('coco/bbox_mAP', 'pascal_voc/mAP', 'cityscapes/bbox_mAP', 'bbox_mAP', 'mAP')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from daft_mm.mm.datasets.transforms import CORRUPTION_GROUPS
    p = argparse.ArgumentParser(
        description='Test a segmentor / detector under common corruptions (daft-mm)',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='corruption groups: ' + '; '.join(
            f'{k}: {", ".join(v)}' for k, v in CORRUPTION_GROUPS.items() if k != 'all'))
    p.add_argument('config', help='test config file path')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--corruptions', nargs='+', default=['benchmark'],
                   help='groups (all, benchmark, noise, blur, weather, digital, holdout) and/or '
                   'corruption names (default: benchmark, the 15 standard ones)')
    p.add_argument('--severities', nargs='+', type=int, default=[1, 2, 3, 4, 5],
                   choices=[1, 2, 3, 4, 5], help='severities to test (default: 1 2 3 4 5)')
    p.add_argument('--work-dir', help='where results go (default: work_dirs/robustness/<config>)')
    p.add_argument('--metric', help='metric key to report (default: mIoU for segmentation; '
                   'coco/bbox_mAP or pascal_voc/mAP for detection)')
    p.add_argument('--seed', type=int, default=0,
                   help='corruption seed: every image is corrupted the same way for every model '
                   '(default: %(default)s)')
    p.add_argument('--skip-clean', action='store_true',
                   help='do not evaluate clean data (P and rPC are then missing)')
    p.add_argument('--resume', action='store_true',
                   help='keep the results in <work-dir>/robustness.json and only run what is '
                   'missing; refused if they came from another config, --cfg-options, '
                   'checkpoint, --metric or --seed')
    p.add_argument('--overwrite', action='store_true',
                   help='replace an existing <work-dir>/robustness.json (default: refuse, so that '
                   'the results of another run are never lost silently)')
    p.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value. data_root=PATH is applied to every '
        'dataloader')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                   help='job launcher')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


# ------------------------------------------------------------------------------------ pipeline
def _datasets(dataset_cfg: Any) -> List[Any]:
    """The leaf dataset configs of a (possibly wrapped / concatenated) dataset config."""
    if 'datasets' in dataset_cfg:
        return [d for sub in dataset_cfg['datasets'] for d in _datasets(sub)]
    if 'dataset' in dataset_cfg and 'pipeline' not in dataset_cfg:
        return _datasets(dataset_cfg['dataset'])
    return [dataset_cfg]


def with_corruption(dataloader_cfg: Any, corruption: str, severity: int, seed: int) -> Any:
    """A copy of a test dataloader config whose pipelines corrupt each image right after loading
    it (before any resize, as the corruptions are defined on the original image)."""
    cfg = copy.deepcopy(dataloader_cfg)
    for dataset in _datasets(cfg['dataset']):
        pipeline = dataset.get('pipeline')
        if not pipeline:
            raise ValueError('the test dataset config has no pipeline to insert the corruption in')
        idx = next((i for i, t in enumerate(pipeline)
                    if isinstance(t.get('type'), str) and t['type'].startswith('LoadImageFrom')),
                   None)
        if idx is None:
            types = [t.get('type') for t in pipeline]
            raise ValueError(f'no LoadImageFrom* transform in the test pipeline {types}: '
                             'ImageCorruption must come right after the image is loaded')
        pipeline.insert(idx + 1, dict(type='ImageCorruption', corruption=corruption,
                                      severity=severity, seed=seed))
    return cfg


def pick_metric(metrics: Mapping[str, Any], task: str, wanted: Optional[str]) -> str:
    if wanted is not None:
        if wanted not in metrics:
            raise KeyError(f'--metric {wanted!r} is not among the evaluator\'s metrics '
                           f'{sorted(metrics)}')
        return wanted
    for key in (_SEG_KEYS if task == 'seg' else _DET_KEYS):
        if key in metrics:
            return key
    raise KeyError(f'cannot tell the main metric among {sorted(metrics)}; pass --metric')


# ------------------------------------------------------------------------------------ provenance
#: config keys that do not change a result: where it is written, how it is launched
_NOT_PROVENANCE = ('work_dir', 'launcher', 'load_from', 'resume')


def provenance(cfg: Any, checkpoint: str, metric: Optional[str], seed: int) -> Dict[str, Any]:
    """What the numbers depend on: the config as loaded (--cfg-options merged, data_root
    included), the checkpoint's content (not its path), the requested metric and the seed."""
    import hashlib

    from daft_mm.utils import file_digest
    def named(obj: Any) -> str:  # classes / functions in pure-Python configs: by name, not id
        name = getattr(obj, '__qualname__', None)
        return f'{getattr(obj, "__module__", "")}.{name}' if name else repr(obj)

    conf = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_PROVENANCE}
    text = json.dumps(conf, sort_keys=True, default=named)
    local = osp.expanduser(checkpoint)
    return dict(config_sha256=hashlib.sha256(text.encode()).hexdigest()[:16],
                checkpoint_sha256=file_digest(local) if osp.isfile(local) else checkpoint,
                metric=metric, seed=seed)


_WHAT = dict(config_sha256='config or --cfg-options', checkpoint_sha256='checkpoint content',
             metric='--metric', seed='--seed')


def load_previous(out_json: str, prov: Mapping[str, Any]) -> Dict[str, Any]:
    """The results of ``out_json`` for --resume, after checking they come from the same run."""
    try:
        old = json.loads(Path(out_json).read_text())
    except ValueError as exc:
        raise RuntimeError(
            f'--resume: {out_json} is not valid JSON ({exc}); it was cut short, e.g. by a kill '
            'while an older version of this tool wrote it. Fix: delete it (or pass --overwrite '
            'without --resume) to evaluate from scratch') from None
    recorded = old.get('provenance')
    if not isinstance(recorded, dict):
        raise RuntimeError(
            f'--resume: {out_json} does not record what its results depend on (written by an '
            'older version), so they cannot be checked against this run. Fix: --overwrite '
            'without --resume to evaluate from scratch, or another --work-dir')
    differ = [_WHAT[k] for k in _WHAT if recorded.get(k) != prov.get(k)]
    if differ:
        raise RuntimeError(
            f'--resume: the results in {out_json} come from another run (different '
            f'{", ".join(differ)}: recorded {[recorded.get(k) for k in _WHAT]}, now '
            f'{[prov.get(k) for k in _WHAT]}); mixing them would report numbers of two models '
            'or datasets as one. Fix: another --work-dir, or --overwrite without --resume')
    return old


# ------------------------------------------------------------------------------------ results
class PerClassTables(logging.Filter):
    """Keeps the evaluators' per-class tables (mmseg's IoUMetric, mmdet's VOC/COCO metrics)
    off the terminal and collects them for the JSON: one table per pass, 15 corruptions x 5
    severities, would bury the results. The log file keeps everything."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: List[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().strip()
        if text == 'per class results:':
            return False
        lines = text.splitlines()
        if len(lines) >= 4 and lines[0].startswith('+') and lines[1].startswith('|'):
            self.tables.append(text)
            return False
        return True

    def attach(self, logger: logging.Logger) -> None:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler, logging.FileHandler):
                handler.addFilter(self)

    def pop(self) -> List[Dict[str, Dict[str, Optional[float]]]]:
        """The tables collected since the last call, as {row name: {column: value}}."""
        tables, self.tables = self.tables, []
        return [parse_table(t) for t in tables]


def parse_table(text: str) -> Dict[str, Dict[str, Optional[float]]]:
    """A prettytable / terminaltables text table as {first column: {header: number}}."""
    rows = [[c.strip() for c in line.strip().strip('|').split('|')]
            for line in text.splitlines() if line.startswith('|')]
    if not rows:
        return {}

    def num(value: str) -> Optional[float]:
        try:
            x = float(value)
        except ValueError:
            return None
        return x if x == x else None  # NaN -> None (strict JSON)

    header = rows[0]
    return {row[0]: {h: num(v) for h, v in zip(header[1:], row[1:])} for row in rows[1:]}


def summarize(results: Dict[str, Any]) -> Dict[str, Any]:
    """Per-corruption means, mPC, rPC from ``results['corrupted'][name][str(severity)]``."""
    per = {name: sum(v.values()) / len(v) for name, v in results['corrupted'].items() if v}
    values = [x for v in results['corrupted'].values() for x in v.values()]
    out = {'mean_per_corruption': per, 'mPC': sum(values) / len(values) if values else None}
    clean = results.get('clean')
    out['rPC'] = 100.0 * out['mPC'] / clean if clean and out['mPC'] is not None else None
    return out


def table(results: Dict[str, Any], severities: Sequence[int]) -> str:
    metric = results['metric']
    head = ['corruption'] + [f'sev {s}' for s in severities] + ['mean']
    lines = [f'{metric} of {results["checkpoint"]}', '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]

    def f(x: Optional[float]) -> str:
        return '-' if x is None else f'{x:.2f}'

    for name, by_sev in results['corrupted'].items():
        row = [name] + [f(by_sev.get(str(s))) for s in severities]
        row.append(f(results['summary']['mean_per_corruption'].get(name)))
        lines.append('| ' + ' | '.join(row) + ' |')
    s = results['summary']
    lines += ['', f'clean (P): {f(results.get("clean"))}   mPC: {f(s["mPC"])}   '
              f'rPC: {f(s["rPC"])}%']
    return '\n'.join(lines)


def plot(results: Dict[str, Any], severities: Sequence[int], out: str) -> List[str]:
    """Metric vs severity, one line per corruption; returns the texts written on the figure
    (title, and a footnote naming the checkpoint and saying what mPC / rPC are)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap('tab20')
    for i, (name, by_sev) in enumerate(results['corrupted'].items()):
        xs = [s for s in severities if str(s) in by_sev]
        ax.plot(xs, [by_sev[str(s)] for s in xs], marker='o', color=cmap(i % 20), label=name)
    if results.get('clean') is not None:
        ax.axhline(results['clean'], color='k', linestyle='--', label='clean')
    ax.set_xticks(list(severities))
    ax.set_xlabel('severity')
    ax.set_ylabel(results['metric'])
    s = results['summary']
    title = f'{results["metric"]} under corruption: {osp.basename(str(results["checkpoint"]))}'
    scores = []
    if s['mPC'] is not None:
        scores.append(f'mPC {s["mPC"]:.2f}')
    if s['rPC'] is not None:
        scores.append(f'rPC {s["rPC"]:.1f}%')
    ax.set_title(title + ('\n' + ', '.join(scores) if scores else ''), fontsize=10)
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc='upper left')
    note = (f'checkpoint: {results["checkpoint"]}\nmPC: mean {results["metric"]} over the '
            'corruptions and severities shown; rPC: mPC / clean (dashed line), in %')
    fig.text(0.01, 0.01, note, fontsize=7, va='bottom')
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    from daft_mm.utils import atomic_write
    with atomic_write(out, 'wb') as f:
        fig.savefig(f, dpi=110, format='png')
    plt.close(fig)
    return [ax.get_title(), note]


# ------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)

    import daft_mm.mm  # noqa: F401  (registers ImageCorruption, DAFTModel; applies compat fixes)
    from daft_mm.mm.cli import (TEST_LOADERS, close_distributed, detect_task, format_metrics,
                                load_config)
    from daft_mm.mm.datasets.transforms import corruption_names
    from mmengine.dist import is_main_process
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner, TestLoop

    from daft_mm.utils import atomic_write, atomic_write_json

    corruptions = corruption_names(args.corruptions)  # fails early on a typo
    severities = sorted(set(args.severities))
    if not osp.isfile(osp.expanduser(args.checkpoint)) and '://' not in args.checkpoint:
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist')
    work_dir = args.work_dir or osp.join(
        'work_dirs', 'robustness', osp.splitext(osp.basename(args.config))[0])
    cfg = load_config(args.config, args.cfg_options, work_dir=work_dir, launcher=args.launcher,
                      used_loaders=TEST_LOADERS)
    task = detect_task(cfg)
    cfg.load_from = args.checkpoint
    if cfg.get('test_dataloader') is None or cfg.get('test_evaluator') is None:
        raise ValueError(f'{args.config} has no test_dataloader / test_evaluator to evaluate with')
    with_corruption(cfg.test_dataloader, corruptions[0], 1, args.seed)  # pipeline check, early

    out_json = osp.join(work_dir, 'robustness.json')
    prov = provenance(cfg, args.checkpoint, args.metric, args.seed)
    results: Dict[str, Any] = dict(config=args.config, checkpoint=args.checkpoint, task=task,
                                   metric=args.metric, seed=args.seed, clean=None, corrupted={},
                                   all_metrics={}, provenance=prov)
    if args.resume and args.overwrite:
        raise ValueError('--resume keeps the results of robustness.json, --overwrite replaces '
                         'them: pass one of them')
    if args.resume and osp.isfile(out_json):
        old = load_previous(out_json, prov)
        results.update(clean=old.get('clean'), corrupted=old.get('corrupted', {}),
                       all_metrics=old.get('all_metrics', {}), metric=old.get('metric'))
    elif osp.isfile(out_json) and not args.overwrite:
        raise FileExistsError(
            f'{out_json} exists (results of an earlier run); this run would overwrite it. Fix: '
            '--resume to complete that run (checked to be the same config, checkpoint and '
            'metric), --overwrite to replace it, or another --work-dir')

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)

    def save() -> None:
        if not is_main_process():
            return
        results['summary'] = summarize(results)
        atomic_write_json(out_json, results, indent=1)

    tables = PerClassTables()
    tables.attach(runner.logger)

    def record(key: str, metrics: Mapping[str, Any]) -> float:
        results['all_metrics'][key] = {k: float(v) for k, v in metrics.items()
                                       if isinstance(v, (int, float))}
        per_class = tables.pop()
        if per_class:
            results.setdefault('per_class', {})[key] = per_class[-1]
        if results['metric'] is None:
            results['metric'] = pick_metric(metrics, task, args.metric)
        elif results['metric'] not in metrics:
            raise KeyError(f'metric {results["metric"]!r} missing from {sorted(metrics)}')
        return float(metrics[results['metric']])

    # The clean pass goes through Runner.test(): it loads the checkpoint and runs the before_run
    # hooks once; the corrupted passes reuse the loaded model with a new dataloader each.
    todo = [(c, s) for c in corruptions for s in severities
            if str(s) not in results['corrupted'].get(c, {})]
    t0 = time.time()
    if not args.skip_clean and results['clean'] is None:
        results['clean'] = record('clean', runner.test())
        save()
        runner.logger.info(f'[robustness] clean {results["metric"]}: {results["clean"]:.2f}')
        opened = False
    else:  # what Runner.test() does before its loop: hooks' before_run, load the checkpoint
        runner.call_hook('before_run')
        runner.load_or_resume()
        opened = True
    for i, (corruption, severity) in enumerate(todo, 1):
        loop = TestLoop(runner, with_corruption(cfg.test_dataloader, corruption, severity,
                                                args.seed), copy.deepcopy(cfg.test_evaluator))
        value = record(f'{corruption}/{severity}', loop.run())
        results['corrupted'].setdefault(corruption, {})[str(severity)] = value
        save()
        elapsed = time.time() - t0
        runner.logger.info(
            f'[robustness] {i}/{len(todo)} {corruption} severity {severity}: '
            f'{results["metric"]} {value:.2f} (elapsed {elapsed:.0f}s, ETA '
            f'{elapsed / i * (len(todo) - i):.0f}s)')
    # Order the table as asked, whatever order a resumed file had.
    results['corrupted'] = {c: {str(s): results['corrupted'][c][str(s)] for s in severities
                                if str(s) in results['corrupted'].get(c, {})}
                            for c in corruptions if c in results['corrupted']}
    save()
    if opened:
        runner.call_hook('after_run')
    if is_main_process():
        text = table(results, severities)
        with atomic_write(osp.join(work_dir, 'robustness.md')) as f:
            f.write(text + '\n')
        plot(results, severities, osp.join(work_dir, 'robustness.png'))
        print(text, flush=True)
        print(f'[daft-mm] robustness: {out_json}, robustness.md, robustness.png in {work_dir}',
              flush=True)
        if results.get('clean') is not None:
            print(f'[daft-mm] {task} clean metrics: '
                  f'{format_metrics(results["all_metrics"]["clean"])}', flush=True)
    close_distributed()
    return results


if __name__ == '__main__':
    main()
