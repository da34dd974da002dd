"""Summaries, the markdown table and the figures of a benchmark report.

Two views, because one chosen point per method can hide a trade-off: the table at the settings
chosen on ID-val (mean ± std over seeds), and every run of the search as a point in (ID mIoU,
OOD mean mIoU), one colour per method, with each method's Pareto front.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

__all__ = ['stat', 'summarize', 'pareto_front', 'point_means', 'front_lines', 'report_title',
           'markdown_table', 'plot_report']


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


def report_title(quick: bool, n_seeds: int, task: str = 'demo') -> str:
    """Says how far a report can be trusted: --quick is a smoke test, one seed has no spread."""
    parts = ['--quick smoke run (reduced data and schedule, not the benchmark)'] if quick else []
    parts.append('1 seed, no spread' if n_seeds == 1 else f'mean ± std over {n_seeds} seeds')
    return f'daft-mm comparison on {task}: ' + '; '.join(parts)


def _fmt(s: Mapping[str, Any], digits: int = 2) -> str:
    """``mean ± std``; one seed has no spread, so just the value (never a made-up ± 0.00)."""
    if len(s.get('values', ())) == 1:
        return f'{s["mean"]:.{digits}f}'
    return f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}'


def markdown_table(summary: Mapping[str, Any], ood_names: Sequence[str],
                   settings: Mapping[str, str]) -> str:
    head = (['Method', 'setting', 'ID-val mIoU', 'ID mIoU'] + list(ood_names)
            + ['OOD mean', 'feature cos'])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for method, m in summary.items():
        row = [method, settings.get(method, ''), _fmt(m['id_val_miou']), _fmt(m['id_miou'])]
        row += [_fmt(m['ood_miou'][n]) for n in ood_names]
        row += [_fmt(m['ood_mean_miou']), _fmt(m['cosine_similarity'], 4)]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def plot_report(summary: Mapping[str, Any], search_runs: Sequence[Mapping[str, Any]],
                out: Path, title: str = '') -> None:
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
    for i, (key, label) in enumerate((('id_miou', 'ID'), ('ood_mean_miou', 'OOD mean'))):
        xs = [j + (i - 0.5) * width for j in range(len(methods))]
        ax.bar(xs, [summary[m][key]['mean'] for m in methods], width,
               yerr=[summary[m][key]['std'] for m in methods], capsize=3, label=label,
               color=('tab:blue', 'tab:orange')[i])
    ax.set_xticks(range(len(methods)), [m.replace(' ', '\n') for m in methods], fontsize=8)
    ax.set_ylabel('mIoU (%)')
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
    ax2.set_xlabel('ID mIoU (%)')
    ax2.set_ylabel('OOD mean mIoU (%)')
    ax2.set_title('every search run (mean over its seeds); lines: Pareto fronts', fontsize=10)
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
