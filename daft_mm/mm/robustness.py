"""Robustness under corruptions (ImageNet-C style, as in mmdet's robustness tool): the test
loader with ``ImageCorruption`` inserted, the metric to report, the provenance a result records,
and its summary (``P``, ``mPC``, ``rPC``), table and plot. ``tools/test_robustness.py`` is the
command line.
"""
from __future__ import annotations

import copy
import json
import logging
import os.path as osp
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ['with_corruption', 'pick_metric', 'provenance', 'load_previous', 'PerClassTables',
           'parse_table', 'summarize', 'table', 'plot']

#: Metric keys tried in order when --metric is not given.
_SEG_KEYS = ('mIoU', )
_DET_KEYS = ('coco/bbox_mAP', 'pascal_voc/mAP', 'cityscapes/bbox_mAP', 'bbox_mAP', 'mAP')


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
