"""The distortion analysis as text, figures and files: rendered from its JSON result
(:func:`daft_mm.mm.distortion.analyze_distortion`), so the printed summary, the plots and the file
always agree, and kept apart per inputs (an analysis is not overwritten by one of other inputs).
``tools/analyze_distortion.py`` is the command line.
"""
from __future__ import annotations

import argparse
import json
import math
import os.path as osp
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .distortion import CONVERTED, PRETRAINED

__all__ = ['format_summary', 'plot_features', 'plot_parameters', 'SYMLOG_LINTHRESH',
           'analysis_inputs', 'default_out_dir', 'refuse_other_analysis']


# ---------------------------------------------------------------------------------- results
def _fmt(value: Optional[float]) -> str:
    return 'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f'{value:.6g}'


def format_summary(result: Mapping[str, Any]) -> str:
    """The printed summary, rendered from the JSON result (so the two always agree)."""
    lines = [f'Distortion of the backbone ({result["config"]}), features on '
             f'{result["num_images"]} {result["split"]} image(s), level(s) '
             f'{result["feature_levels"]}']
    for ref, doc in result['reference_kinds'].items():
        lines.append(f'  reference {ref!r} = {doc}')
    for run, entry in result['runs'].items():
        for ref, comp in entry['comparisons'].items():
            lines.append(f'run {run!r} vs {ref!r} ({comp["reference_checkpoint"]}):')
            for level, feats in comp['features'].items():
                mean = feats['mean']
                text = (f'  features out{level}: mean cosine {_fmt(mean["cosine"])}, '
                        f'mean L2 {_fmt(mean["l2"])}')
                if 'pixel_cosine' in mean:
                    text += f', mean pixel cosine {_fmt(mean["pixel_cosine"])}'
                lines.append(text)
            params = comp['parameters']
            stages = params['stages']
            lines.append('  mean relative change  ' + ' '.join(f'{s:>10}' for s in stages)
                         + f' {"all":>10}')
            for q, overall in params['quantity_means'].items():
                per_stage = params['stage_means'].get(q, {})
                lines.append(f'  {q:<20} ' + ' '.join(f'{_fmt(per_stage.get(s)):>10}'
                                                      for s in stages) + f' {_fmt(overall):>10}')
            if params['skipped_in_means']:
                lines.append(f'  ({len(params["skipped_in_means"])} entries moved away from a '
                             'zero reference: relative change undefined, left out of the means; '
                             'their abs_change is in the JSON)')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------- figures
def plot_features(result: Mapping[str, Any], path: str) -> List[Tuple[str, float]]:
    """Overlaid histograms, one colour per run (solid: vs pretrained, dashed: vs converted).

    Cosines are drawn as ``1 - cosine`` on a log axis (exact matches clipped to 1e-9): fine-tuned
    features sit at cosines like 0.997, which linear bins over [-1, 1] cannot tell apart.
    Curves that coincide (a run compared with two references that hold the same backbone) would
    hide each other: each curve is drawn thinner than the one before it, on top, so the earlier
    one shows as a wide band around it, and its legend entry says which curve it equals.
    Returns (legend label, line width) per curve.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    floor = 1e-9
    legend: List[Tuple[str, float]] = []
    levels = [str(level) for level in result['feature_levels']]
    runs = list(result['runs'])
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    styles = {PRETRAINED: '-', CONVERTED: '--'}
    curves = [(i, run, ref, comp) for i, run in enumerate(runs)
              for ref, comp in result['runs'][run]['comparisons'].items()]
    titles = {'cosine': '1 - cosine, pooled per image', 'l2': 'L2 distance, pooled per image',
              'pixel': '1 - cosine per pixel (fraction of pixels)'}
    fig, axes = plt.subplots(len(levels), 3, figsize=(15, 3.6 * len(levels)), squeeze=False)
    for r, level in enumerate(levels):
        per_image = {q: [[v for v in comp['features'][level]['per_image'][q] if v is not None]
                         for _, _, _, comp in curves] for q in ('cosine', 'l2')}
        # Shared bins per panel, so runs are comparable bar for bar.
        dists = [np.clip(1.0 - np.asarray(v, dtype=float), floor, 2.0) for v in per_image['cosine']]
        hi = max(float(d.max()) for d in dists if len(d)) if any(len(d) for d in dists) else 1.0
        cos_bins = np.logspace(math.log10(floor), math.log10(max(hi * 1.5, 10 * floor)), 41)
        l2_all = [x for v in per_image['l2'] for x in v] or [0.0]
        l2_bins = np.linspace(0.0, max(max(l2_all) * 1.05, 1e-12), 31)
        drawn = []
        for k, (i, run, ref, comp) in enumerate(curves):
            label = f'{run} vs {ref}'
            same = [other for other, data in drawn
                    if data == (per_image['cosine'][k], per_image['l2'][k])]
            if same:
                label += f' (identical to {same[0]})'
            drawn.append((f'{run} vs {ref}', (per_image['cosine'][k], per_image['l2'][k])))
            width = max(1.2, 1.2 + 1.4 * (len(curves) - 1 - k))
            kw = dict(color=colours[i % len(colours)], linestyle=styles.get(ref, ':'),
                      label=label, linewidth=width, alpha=0.85, zorder=2 + k)
            if r == 0:
                legend.append((label, width))
            axes[r][0].hist(dists[k], bins=cos_bins, histtype='step', **kw)
            axes[r][1].hist(per_image['l2'][k], bins=l2_bins, histtype='step', **kw)
            hist = comp['features'][level].get('pixel_one_minus_cosine_histogram')
            if hist is not None:
                counts = np.asarray(hist['counts'], dtype=float)
                edges = np.asarray(hist['edges'], dtype=float)
                edges[0] = edges[1] / 10  # the exact-match bin, drawable on a log axis
                axes[r][2].stairs(counts / max(counts.sum(), 1.0), edges, **kw)
        for c, key in enumerate(('cosine', 'l2', 'pixel')):
            ax = axes[r][c]
            if key != 'l2':
                ax.set_xscale('log')
                ax.set_xlabel('1 - cosine (exact match at the far left)')
            else:
                ax.set_xlabel('L2')
            ax.set_title(f'backbone out{level}: {titles[key]}', fontsize=10)
            ax.set_ylabel('fraction of pixels' if key == 'pixel' else 'images')
            ax.legend(fontsize=7)
    fig.suptitle('Feature distance to the reference (solid: vs pretrained, dashed: vs converted; '
                 'coinciding curves drawn as a wide band under a thin line)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return legend


#: below this, the symlog axis of parameter_change.png is linear (relative changes smaller than
#: 1e-3 are "unchanged" for a plot)
SYMLOG_LINTHRESH = 1e-3


def plot_parameters(result: Mapping[str, Any], path: str) -> Dict[str, str]:
    """One panel per quantity, relative change per layer along the network; returns each
    panel's y scale.

    Why symlog: the relative change of a parameter whose reference is near zero (BN biases, often
    ~1e-6) can be 1e5 while the rest of the panel is 1e-3..1; on a linear axis that one point
    flattens every other line. Symlog is logarithmic above ``SYMLOG_LINTHRESH`` and linear below
    it, so zero changes stay drawable; the axis label says so.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from daft_mm.core.distortion import QUANTITIES

    log_scale = {'bn_running_mean', 'bn_running_var'}
    runs = list(result['runs'])
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    styles = {PRETRAINED: '-', CONVERTED: '--'}
    fig, axes = plt.subplots(len(QUANTITIES), 1, figsize=(14, 2.8 * len(QUANTITIES)),
                             sharex=True, squeeze=False)
    boundaries: Dict[str, int] = {}
    scales: Dict[str, str] = {}
    for q, ax in zip(QUANTITIES, axes[:, 0]):
        any_positive = False
        for i, run in enumerate(runs):
            for ref, comp in result['runs'][run]['comparisons'].items():
                rows = [row for row in comp['parameters']['layers'] if row['quantity'] == q]
                xs = [row['index'] for row in rows]
                ys = [math.nan if row['relative'] is None else row['relative'] for row in rows]
                any_positive |= any(y > 0 for y in ys if not math.isnan(y))
                ax.plot(xs, ys, marker='.', markersize=3, linewidth=1,
                        color=colours[i % len(colours)], linestyle=styles.get(ref, ':'),
                        label=f'{run} vs {ref}')
                for row in comp['parameters']['layers']:
                    boundaries.setdefault(row['stage'], row['index'])
        if q in log_scale and any_positive:
            ax.set_yscale('log', nonpositive='mask')
            ax.set_ylabel('rel. change (log)')
        else:
            ax.set_yscale('symlog', linthresh=SYMLOG_LINTHRESH)
            ax.set_ylabel(f'rel. change (symlog,\nlinear below {SYMLOG_LINTHRESH:g})', fontsize=8)
        scales[q] = ax.get_yscale()
        ax.set_title(q + (' (log scale; zero changes not drawn)' if q in log_scale and any_positive
                          else ''), fontsize=10)
        ax.legend(fontsize=7, loc='upper left')
    for ax in axes[:, 0]:
        for stage, start in boundaries.items():
            ax.axvline(start - 0.5, color='grey', linewidth=0.8, linestyle=':')
    top = axes[0, 0]
    for stage, start in boundaries.items():
        top.text(start, 1.02, stage, transform=top.get_xaxis_transform(), fontsize=8)
    axes[-1, 0].set_xlabel('layer index along the network (stem -> deepest stage)')
    fig.suptitle('||theta - theta0|| / ||theta0|| per layer (solid: vs pretrained, '
                 'dashed: vs converted)', y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return scales


# ------------------------------------------------------------------------------------- output
def analysis_inputs(args: argparse.Namespace, cfg: Any = None) -> Dict[str, Any]:
    """What an analysis depends on: the config (its path and its resolved content, bases and
    options included: an edited config is another analysis), the checkpoints' paths and bytes,
    the options."""
    from daft_mm.benchmark.data import stable_hash
    from daft_mm.utils import file_digest

    def digest(path: str) -> str:
        return file_digest(path) if osp.isfile(path) else 'missing'

    content = stable_hash(cfg.to_dict()) if cfg is not None else None
    return {
        'config': osp.abspath(args.config), 'config_content': content,
        'cfg_options': list(args.cfg_options or []),
        'pretrained': [osp.abspath(args.pretrained), digest(args.pretrained)],
        'finetuned': {name: [osp.abspath(p), digest(p)] for name, p in args.finetuned},
        'reference_converted': {name: [osp.abspath(p), digest(p)]
                                for name, p in args.reference_converted},
        'convert': sorted(args.convert), 'convert_split': args.convert_split,
        'convert_batches': args.convert_batches, 'convert_var_mode': args.convert_var_mode,
        'split': args.split, 'max_images': args.max_images, 'levels': list(args.levels),
        'seed': args.seed}


def default_out_dir(args: argparse.Namespace, inputs: Dict[str, Any]) -> str:
    import hashlib
    key = hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:8]
    runs = '_'.join(name for name, _ in args.finetuned)[:60]
    return osp.join('work_dirs', 'distortion', osp.splitext(osp.basename(args.config))[0],
                    f'{runs}-{key}')


def refuse_other_analysis(out_dir: str, inputs: Dict[str, Any], overwrite: bool) -> None:
    """An earlier analysis of other inputs in ``out_dir`` is not replaced without --overwrite."""
    path = osp.join(out_dir, 'distortion.json')
    if overwrite or not osp.isfile(path):
        return
    try:
        with open(path) as f:
            earlier = json.load(f).get('inputs')
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier == inputs:
        return
    raise FileExistsError(
        f'{path} holds an analysis of other inputs (runs '
        f'{sorted((earlier or {}).get("finetuned", {})) or "unknown"}); writing here would '
        'replace it. Fix: another --out-dir (the default gives every analysis its own folder), '
        'or --overwrite to replace it')
