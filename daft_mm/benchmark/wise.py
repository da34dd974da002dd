"""WiSE-FT as a row of the comparison: per seed, the two ends of that seed's LP-FT run (the model
after its probe stage, the model at its end: one trajectory) mixed in weight space at ``alpha``
in 0..1, the mix's BatchNorm statistics re-estimated on the ID training data with the project's
statistics pass, ``alpha`` chosen on ID-val (mean over the seeds) like every other setting. No
training: it costs one statistics pass and one ID-val evaluation per seed and ``alpha``, and the
full evaluation at the chosen one. Every result is cached in the work dir.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

from daft_mm.utils import atomic_write_json

from .data import stable_hash
from .methods import Point, get_method, stage_budgets
from .runs import (Context, code_hash, evaluate, id_val_score, load_run_config,
                   lpft_endpoints)
from .variants import method_config

__all__ = ['ALPHAS', 'wise_ft', 'seeds_to_rerun']

ALPHAS: Tuple[float, ...] = tuple(i / 10 for i in range(11))
NAME = 'WiSE-FT'


def _model(ctx: Context) -> Any:
    from mmengine.registry import MODELS
    cfg = load_run_config(ctx, ctx.work_dir / 'unused', 1, {})
    method_config(cfg, get_method('FT'), Point(lr=0.0), backbone=ctx.task.backbone,
                  backbone_prefix=ctx.task.backbone_prefix)
    return MODELS.build(cfg.model), cfg


def _train_batches(ctx: Context, cfg: Any, seed: int) -> Any:
    from mmengine.runner import Runner

    from daft_mm.mm.preparation import one_pass_loader
    return one_pass_loader(Runner.build_dataloader(cfg.train_dataloader, seed=seed), seed)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's random streams seeded, and put back afterwards."""
    import random

    import numpy as np
    import torch
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


_MISSING = object()


def _key(ctx: Context, lpft: Point, probe: Point, seed: int, alpha: float, what: str,
         ends: Tuple[Path, Path]) -> str:
    """A mix's cache key: its two ends named relative to the work dir, so that trials carried
    to another work dir (``benchmarks/trial_cache.py``) are found there."""
    return stable_hash(dict(what=what, seed=seed, alpha=alpha, code=code_hash(),
                            task=ctx.task_key,
                            ends=[p.relative_to(ctx.work_dir).as_posix() for p in ends],
                            lpft=lpft.to_dict(), probe=probe.to_dict()))


def _ends(ctx: Context, lpft: Point, probe: Point, seeds: Sequence[int]
          ) -> Dict[int, Tuple[Path, Path]]:
    """Each seed's LP-FT ends, whether they are there or not."""
    return {seed: lpft_endpoints(ctx, lpft, probe, seed, must_exist=False) for seed in seeds}


def _saved(ctx: Context, key: str) -> Any:
    """The cached value under ``key``, else :data:`_MISSING`."""
    path = ctx.work_dir / 'runs' / NAME / f'{key}.json'
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get('key') == key:
            return saved['result']
    return _MISSING


def _best(id_val: Dict[str, List[float]], alphas: Sequence[float]) -> float:
    """The alpha of the highest mean ID-val over the seeds (ties: the smaller alpha)."""
    return max(alphas, key=lambda a: (sum(id_val[f'{a:g}']) / len(id_val[f'{a:g}']), -a))


def seeds_to_rerun(ctx: Context, lpft: Point, probe: Point, seeds: Sequence[int],
                   alphas: Sequence[float] = ALPHAS) -> List[int]:
    """The seeds whose LP-FT run must train again before WiSE-FT can mix it: its two ends are
    gone (the study's results were carried to another machine without checkpoints) and a mix it
    takes part in is not cached yet."""
    ends = _ends(ctx, lpft, probe, seeds)

    def cached(seed: int, alpha: float, what: str) -> Any:
        return _saved(ctx, _key(ctx, lpft, probe, seed, alpha, what, ends[seed]))

    id_val = {f'{a:g}': [cached(seed, a, 'id_val') for seed in seeds] for a in alphas}
    if any(v is _MISSING for values in id_val.values() for v in values):
        needed = list(seeds)  # the chosen alpha is not known yet: every seed's full run may mix
    else:
        best = _best(id_val, alphas)
        needed = [seed for seed in seeds if cached(seed, best, 'full') is _MISSING]
    return [seed for seed in needed if not all(p.is_file() for p in ends[seed])]


def wise_ft(ctx: Context, lpft: Point, probe: Point, seeds: Sequence[int],
            alphas: Sequence[float] = ALPHAS) -> Tuple[float, List[Dict[str, Any]],
                                                       Dict[str, List[float]]]:
    """(the chosen ``alpha``, each seed's full result at it, ID-val per ``alpha`` and seed).
    Raises ``FileNotFoundError`` when a mix is not cached and its LP-FT run's ends are gone
    (:func:`seeds_to_rerun` names the runs to train again first)."""
    from daft_mm.core import mix_with_statistics
    from daft_mm.mm.plan import split_model
    from daft_mm.mm.preparation import mm_forward
    from daft_mm.mm.safe_load import load_checkpoint_file
    ends = _ends(ctx, lpft, probe, seeds)
    built: List[Any] = []  # the model, built at the first mix that is not cached

    def mixed(seed: int, alpha: float) -> Any:
        if not built:
            built.append(_model(ctx))
        model, cfg = built[0]
        start, end = (load_checkpoint_file(str(p), map_location='cpu')['state_dict']
                      for p in lpft_endpoints(ctx, lpft, probe, seed))
        with _seeded(seed):  # the pipeline's random augmentations: the same on every rerun
            mix_with_statistics(split_model(model)[1], start, end, alpha,
                                _train_batches(ctx, cfg, seed), forward=mm_forward('loss'))
        return model

    def computed(seed: int, alpha: float, what: str, compute: Callable[[Any], Any]) -> Any:
        """The cached value of ``what`` for this seed and alpha, else computed on the mix."""
        key = _key(ctx, lpft, probe, seed, alpha, what, ends[seed])
        value = _saved(ctx, key)
        if value is _MISSING:
            value = compute(mixed(seed, alpha))
            atomic_write_json(str(ctx.work_dir / 'runs' / NAME / f'{key}.json'),
                              dict(key=key, result=value), default=str)
        return value

    def full(model: Any, seed: int, alpha: float) -> Dict[str, Any]:
        result = evaluate(model, ctx)
        result.update(method=NAME, setting=dict(alpha=alpha), seed=seed,
                      budgets=stage_budgets(get_method('LP-FT'), ctx.task.budget,
                                            ctx.task.lp_fraction),  # LP-FT's: no more
                      lp_setting=probe.to_dict(), lpft_setting=lpft.to_dict())
        return result

    id_val = {f'{alpha:g}': [computed(seed, alpha, 'id_val',
                                      lambda model: id_val_score(model, ctx))
                             for seed in seeds] for alpha in alphas}
    best = _best(id_val, alphas)
    results = [computed(seed, best, 'full', lambda model, seed=seed: full(model, seed, best))
               for seed in seeds]
    return best, results, id_val
