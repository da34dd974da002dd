"""Summaries, the markdown table and the figures of a benchmark report.

Two views, because one chosen point per method can hide a trade-off: the table at the settings
chosen on ID-val (mean ± std over seeds), and every run of the search as a point in (ID mIoU,
OOD mean mIoU), one colour per method, with each method's Pareto front.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ['stat', 'summarize', 'pareto_front', 'point_means', 'front_lines', 'report_title',
           'markdown_table', 'plot_report', 'paired_differences', 'paired_lines', 'verdict_line',
           'counts_miou', 'per_class_iou', 'block_bootstrap', 'bootstrap_lines',
           'per_class_lines']


def stat(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and sample std (0 for one value: the table then shows no spread at all)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {'mean': mean, 'std': std, 'values': list(values)}


def summarize(results: Mapping[str, List[Dict[str, Any]]],
              ood_names: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for method, runs in results.items():
        out[method] = {
            'id_val_miou': stat([r['id_val'] for r in runs]),
            'id_miou': stat([r['id'] for r in runs]),
            'ood_miou': {name: stat([r['ood'][name] for r in runs]) for name in ood_names},
            'ood_mean_miou': stat([r['ood_mean'] for r in runs]),
            'cosine_similarity': stat([r['cosine'] for r in runs]),
            'cosine_similarity_pooled': stat([r['cosine_pooled'] for r in runs]),
        }
    return out


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The points no other point beats on both coordinates (ties kept), sorted by the first."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def point_means(search_runs: Sequence[Mapping[str, Any]]
                ) -> Dict[str, List[Tuple[str, float, float]]]:
    """Per method, every searched setting's (label, mean ID, mean OOD mean) over its seeds."""
    by_point: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for r in search_runs:
        by_point.setdefault((r['method'], _label(r['setting'])), []).append(r)
    out: Dict[str, List[Tuple[str, float, float]]] = {}
    for (method, label), rs in by_point.items():
        out.setdefault(method, []).append((label, sum(r['id'] for r in rs) / len(rs),
                                           sum(r['ood_mean'] for r in rs) / len(rs)))
    return out


def _label(setting: Mapping[str, Any]) -> str:
    return ' '.join(f'{k}={v:g}' if isinstance(v, (int, float)) else f'{k}={v}'
                    for k, v in sorted(setting.items()))


def front_lines(search_runs: Sequence[Mapping[str, Any]]) -> List[str]:
    """One line per method: its Pareto front in (ID, OOD mean), from high ID to high OOD."""
    lines = []
    for method, points in point_means(search_runs).items():
        front = set(pareto_front([(i, o) for _, i, o in points]))
        kept = sorted((p for p in points if (p[1], p[2]) in front), key=lambda p: -p[1])
        lines.append(f'{method} ({len(points)} settings searched): ' + '; '.join(
            f'{label}: {i:.2f} / {o:.2f}' for label, i, o in kept))
    return lines


def report_title(quick: bool, n_seeds: int, task: str = 'demo',
                 max_images: Optional[int] = None, budget: Optional[int] = None) -> str:
    """Says how far a report can be trusted: --quick is a smoke test, one seed has no spread."""
    parts = []
    if quick:
        reduced = [f'{budget} iterations' if budget else 'a few iterations']
        if max_images:
            reduced.insert(0, f'at most {max_images} images per set')
        parts.append(f'--quick smoke run ({", ".join(reduced)}, one setting per method: not '
                     'the benchmark)')
    parts.append('1 seed, no spread' if n_seeds == 1 else f'mean ± std over {n_seeds} seeds')
    return f'daft-mm comparison on {task}: ' + '; '.join(parts)


#: Two-sided 95% quantiles of Student's t by degrees of freedom (n seeds - 1).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _t975(df: int) -> float:
    """The quantile of the nearest tabulated df at or below ``df`` (never a narrower interval
    than the exact one)."""
    return _T975[max(k for k in _T975 if k <= df)]


def _paired(diffs: Dict[Any, float]) -> Dict[str, Any]:
    values = list(diffs.values())
    s = stat(values)
    half = _t975(len(values) - 1) * s['std'] / math.sqrt(len(values)) if len(values) > 1 else None
    return dict(per_seed={str(k): v for k, v in diffs.items()}, mean=s['mean'],
                low=None if half is None else s['mean'] - half,
                high=None if half is None else s['mean'] + half,
                higher=sum(v > 0 for v in values), n=len(values))


def paired_differences(results: Mapping[str, List[Mapping[str, Any]]],
                       ood_names: Sequence[str], reference: str = 'FT'
                       ) -> Dict[str, Dict[str, Any]]:
    """Per method, its score minus ``reference``'s, seed by seed (runs with the same seed share
    the data order and the head's init, so the pairing removes that noise), for ID, each OOD set
    and (with several) the OOD mean: per-seed values, mean, a 95% t-interval over seeds (none
    for one seed) and on how many seeds the method was higher."""
    if reference not in results:
        return {}
    ref = {r['seed']: r for r in results[reference]}
    metrics = [('ID', lambda r: r['id'])] + [(n, lambda r, n=n: r['ood'][n]) for n in ood_names]
    if len(ood_names) > 1:
        metrics.append(('OOD mean', lambda r: r['ood_mean']))
    out = {}
    for method, runs in results.items():
        pairs = [(r, ref[r['seed']]) for r in runs if method != reference and r['seed'] in ref]
        if pairs:
            out[method] = {name: _paired({r['seed']: get(r) - get(f) for r, f in pairs})
                           for name, get in metrics}
    return out


def _diff_cell(d: Mapping[str, Any]) -> str:
    interval = (f' [{d["low"]:+.2f}, {d["high"]:+.2f}]' if d.get('low') is not None else '')
    seeds = ', '.join(f'{v:+.2f}' for v in d['per_seed'].values())
    return f'{d["mean"]:+.2f}{interval}; {d["higher"]}/{d["n"]} higher ({seeds})'


def paired_lines(paired: Mapping[str, Mapping[str, Any]], ood_names: Sequence[str]) -> str:
    """The Markdown table of :func:`paired_differences`."""
    names = ['ID'] + list(ood_names) + (['OOD mean'] if len(ood_names) > 1 else [])
    lines = ['Paired differences to FT (method - FT, seed by seed; mean [95% t-interval over '
             'seeds]; seeds on which the method is higher (each seed\'s difference)):', '',
             '| Method | ' + ' | '.join(names) + ' |', '|' + '---|' * (len(names) + 1)]
    for method, by_metric in paired.items():
        lines.append(f'| {method} | ' + ' | '.join(_diff_cell(by_metric[n]) for n in names)
                     + ' |')
    return '\n'.join(lines)


def _direction(d: Mapping[str, Any]) -> str:
    if d.get('low') is None:
        return 'unknown'
    return 'higher' if d['low'] > 0 else 'lower' if d['high'] < 0 else 'no clear difference'


#: The ablations that hold each half of a method alone: the verdict says which carries it.
PARTS = {'DAFT': ('DAFT w/o conversion', 'conversion only', 'DAFT w/o zero init',
                  'DAFT at ratio 1')}


def verdict_line(paired: Mapping[str, Mapping[str, Any]], method: str = 'DAFT',
                 ood_name: Optional[str] = None,
                 intervals: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 floor: Optional[float] = None,
                 scores: Optional[Mapping[str, float]] = None) -> str:
    """One sentence on ``method`` against FT from the paired differences: OOD (the mean over the
    OOD sets, or the one set) and ID, each higher / lower only when its 95% interval excludes
    zero, then each of its parts alone (:data:`PARTS`) on the same OOD measure, so the line says
    which half carries the effect. One seed gives no interval and so no verdict. ``ood_name``:
    the headline set (a real shift) instead of the OOD mean; ``intervals``: its paired
    differences with other intervals (:func:`block_bootstrap`), used where given. ``floor``:
    the image-blind prior's score on that set and ``scores`` the methods' mean scores there: a
    difference between two models barely above an image-blind floor is not robustness, so the
    line says how far above it they are."""
    if method not in paired:
        return ''
    by_metric = paired[method]
    if ood_name is None or ood_name not in by_metric:
        ood_name = ('OOD mean' if 'OOD mean' in by_metric
                    else next(k for k in by_metric if k != 'ID'))
    intervals = intervals or {}

    def on_ood(name: str) -> Mapping[str, Any]:
        return intervals.get(name) or paired[name][ood_name]

    ood, id_ = on_ood(method), by_metric['ID']
    head = (f'{method} vs FT over {ood["n"]} paired seed(s): {ood_name} {ood["mean"]:+.2f}, '
            f'higher on {ood["higher"]}/{ood["n"]}; ID {id_["mean"]:+.2f}')
    if ood['low'] is None:
        return head + '. One seed: no interval, so no verdict (use several seeds).'
    head += (f' (95% intervals: {ood_name} [{ood["low"]:+.2f}, {ood["high"]:+.2f}], ID '
             f'[{id_["low"]:+.2f}, {id_["high"]:+.2f}])')
    o, i = _direction(ood), _direction(id_)
    parts = [f'{part} {_direction(on_ood(part))} ({on_ood(part)["mean"]:+.2f})'
             for part in PARTS.get(method, ()) if part in paired]
    carried = f' Its parts alone vs FT on {ood_name}: {"; ".join(parts)}.' if parts else ''
    if o == 'higher' and i != 'lower':
        says = ('better out of distribution without a clear ID loss'
                + (' (ID higher too)' if i == 'higher' else ''))
    elif o == 'higher':
        says = 'better out of distribution, at a clear ID cost'
    elif o == 'lower':
        says = 'worse out of distribution than FT'
    else:
        says = ('no clear OOD difference from FT'
                + ('; ID higher' if i == 'higher' else '; ID lower' if i == 'lower' else ''))
    above = ''
    if floor is not None and scores and 'FT' in scores and method in scores:
        above = (f' The image-blind floor scores {floor:.2f} on {ood_name}; FT '
                 f'{scores["FT"]:.2f} ({scores["FT"] - floor:+.2f} above it), {method} '
                 f'{scores[method]:.2f} ({scores[method] - floor:+.2f}).')
    return f'{head}: {says}, at this budget and with these seeds.{carried}{above}'


def _fmt(s: Mapping[str, Any], digits: int = 2) -> str:
    """``mean ± std``; one seed has no spread, so just the value (never a made-up ± 0.00)."""
    if len(s.get('values', ())) == 1:
        return f'{s["mean"]:.{digits}f}'
    return f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}'


def markdown_table(summary: Mapping[str, Any], ood_names: Sequence[str],
                   settings: Mapping[str, str], metric: str = 'mIoU') -> str:
    """``metric``: the score's name (the summary keys say miou for every task's score)."""
    mean = len(ood_names) > 1  # with one OOD set its mean would repeat it
    head = (['Method', 'setting', f'ID-val {metric}', f'ID {metric}'] + list(ood_names)
            + (['OOD mean'] if mean else []) + ['feature cos'])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for method, m in summary.items():
        row = [method, settings.get(method, ''), _fmt(m['id_val_miou']), _fmt(m['id_miou'])]
        row += [_fmt(m['ood_miou'][n]) for n in ood_names]
        row += ([_fmt(m['ood_mean_miou'])] if mean else []) + [_fmt(m['cosine_similarity'], 4)]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def plot_report(summary: Mapping[str, Any], search_runs: Sequence[Mapping[str, Any]],
                out: Path, title: str = '', ood_label: str = 'OOD mean',
                metric: str = 'mIoU') -> None:
    """Left: ID and OOD-mean bars at the chosen settings. Right: every search run in
    (ID, OOD mean) with each method's Pareto front (mean over a point's seeds)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    methods = list(summary)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    colour = {m: colours[i % len(colours)] for i, m in enumerate(methods)}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.38
    for i, (key, label) in enumerate((('id_miou', 'ID'), ('ood_mean_miou', ood_label))):
        xs = [j + (i - 0.5) * width for j in range(len(methods))]
        ax.bar(xs, [summary[m][key]['mean'] for m in methods], width,
               yerr=[summary[m][key]['std'] for m in methods], capsize=3, label=label,
               color=('tab:blue', 'tab:orange')[i])
    ax.set_xticks(range(len(methods)), [m.replace(' ', '\n') for m in methods], fontsize=8)
    ax.set_ylabel(f'{metric} (%)')
    ax.set_title('at the settings chosen on ID-val', fontsize=10)
    ax.legend(fontsize=8)
    means = point_means(search_runs)
    for method in methods:
        pts = [(i, o) for _, i, o in means.get(method, [])]
        if not pts:
            continue
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.5,
                    color=colour[method])
        front = pareto_front(pts)
        ax2.plot([p[0] for p in front], [p[1] for p in front], '-o', ms=4, color=colour[method],
                 label=method)
    ax2.set_xlabel(f'ID {metric} (%)')
    ax2.set_ylabel(f'{ood_label} {metric} (%)')
    ax2.set_title('every search run (mean over its seeds); lines: Pareto fronts', fontsize=10)
    if means:
        ax2.legend(fontsize=7)
    else:  # recorded settings whose file holds no search runs
        ax2.text(0.5, 0.5, 'no search runs\n(settings recorded by an earlier search)',
                 ha='center', va='center', transform=ax2.transAxes, fontsize=10)
        ax2.set_xticks([])
        ax2.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------- per image: classes, blocks
def counts_miou(intersect: Any, union: Any) -> float:
    """mIoU (%) of summed per-image counts (``[images, classes]``), classes with no pixel in
    the labels or the predictions skipped, as mmseg's IoUMetric does."""
    import numpy as np
    inter, uni = np.asarray(intersect, float).sum(0), np.asarray(union, float).sum(0)
    with np.errstate(invalid='ignore', divide='ignore'):
        return float(np.nanmean(np.where(uni > 0, inter / uni, np.nan)) * 100)


def per_class_iou(runs: Sequence[Mapping[str, Any]], set_name: str,
                  classes: Sequence[str]) -> Dict[str, Optional[float]]:
    """Each class's IoU (%) on ``set_name``, mean over the runs (seeds); None where no run
    saw the class in its labels or predictions."""
    import numpy as np
    per_seed = []
    for r in runs:
        c = r['counts'][set_name]
        inter, uni = np.asarray(c['intersect'], float).sum(0), np.asarray(c['union'], float).sum(0)
        with np.errstate(invalid='ignore', divide='ignore'):
            per_seed.append(np.where(uni > 0, inter / uni * 100, np.nan))
    with np.errstate(invalid='ignore'):
        mean = np.nanmean(np.stack(per_seed), 0) if per_seed else []
    return {name: (None if np.isnan(v) else float(v)) for name, v in zip(classes, mean)}


def block_bootstrap(results: Mapping[str, List[Mapping[str, Any]]], set_name: str,
                    reference: str = 'FT', block: int = 10, samples: int = 2000,
                    seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """Per method, its ``set_name`` mIoU minus ``reference``'s, paired by seed, with a 95%
    interval from a bootstrap that resamples both what varies: moving blocks of ``block``
    consecutive images (neighbouring video frames are not independent samples; a block keeps
    their correlation) and the seeds, the same draw for both methods. ``mean``: the difference
    on the whole set, averaged over seeds; ``per_seed``: each seed's. Each method draws from its
    own stream (``seed`` and its name), so its interval does not depend on the report's other
    rows."""
    import zlib

    import numpy as np
    if reference not in results:
        return {}
    ref = {r['seed']: r for r in results[reference] if set_name in (r.get('counts') or {})}
    out: Dict[str, Dict[str, Any]] = {}
    for method, runs in results.items():
        rng = np.random.default_rng([seed, zlib.crc32(method.encode())])
        pairs = [(r, ref[r['seed']]) for r in runs
                 if method != reference and r['seed'] in ref and set_name in (r.get('counts') or {})]
        if not pairs:
            continue
        arrays = [tuple(np.asarray(run['counts'][set_name][k], float) for run in pair
                        for k in ('intersect', 'union')) for pair in pairs]
        n = len(arrays[0][0])
        length = max(1, min(block, n))
        starts = n - length + 1
        per_seed = {str(r['seed']): counts_miou(a[0], a[1]) - counts_miou(a[2], a[3])
                    for (r, _), a in zip(pairs, arrays)}
        draws = []
        for _ in range(samples):
            first = rng.integers(0, starts, size=-(-n // length))
            rows = (first[:, None] + np.arange(length)[None, :]).ravel()[:n]
            chosen = rng.integers(0, len(arrays), size=len(arrays))
            draws.append(np.mean([counts_miou(arrays[i][0][rows], arrays[i][1][rows])
                                  - counts_miou(arrays[i][2][rows], arrays[i][3][rows])
                                  for i in chosen]))
        low, high = np.percentile(draws, [2.5, 97.5]) if len(pairs) > 1 else (None, None)
        values = list(per_seed.values())
        out[method] = dict(mean=float(np.mean(values)),
                           low=None if low is None else float(low),
                           high=None if high is None else float(high),
                           per_seed=per_seed, higher=sum(v > 0 for v in values),
                           n=len(values), block=length, samples=samples,
                           interval='95% bootstrap over blocks of images and seeds')
    return out


def bootstrap_lines(boot: Mapping[str, Mapping[str, Any]], set_name: str) -> str:
    """The Markdown table of :func:`block_bootstrap`."""
    if not boot:
        return ''
    first = next(iter(boot.values()))
    lines = [f'Paired differences to FT on {set_name} (method - FT per seed; mean [95% interval '
             f'from a bootstrap over blocks of {first["block"]} consecutive images and over the '
             f'seeds, {first["samples"]} draws]; seeds on which the method is higher):', '',
             f'| Method | {set_name} |', '|---|---|']
    for method, d in boot.items():
        seeds = ', '.join(f'{v:+.2f}' for v in d['per_seed'].values())
        interval = (f' [{d["low"]:+.2f}, {d["high"]:+.2f}]' if d['low'] is not None
                    else ' (one seed: no interval)')
        lines.append(f'| {method} | {d["mean"]:+.2f}{interval}; {d["higher"]}/{d["n"]} higher '
                     f'({seeds}) |')
    return '\n'.join(lines)


def per_class_lines(per_class: Mapping[str, Mapping[str, Optional[float]]], set_name: str) -> str:
    """The Markdown table of each method's per-class IoU on ``set_name``."""
    if not per_class:
        return ''
    classes = list(next(iter(per_class.values())))
    lines = [f'Per-class IoU (%) on {set_name}, mean over seeds (- : the class is in no label '
             'or prediction):', '', '| Method | ' + ' | '.join(classes) + ' |',
             '|' + '---|' * (len(classes) + 1)]
    for method, values in per_class.items():
        lines.append(f'| {method} | ' + ' | '.join('-' if values[c] is None else f'{values[c]:.1f}'
                                                  for c in classes) + ' |')
    return '\n'.join(lines)
