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
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

from daft_mm.utils import atomic_write_json

from .data import stable_hash
from .methods import Point, get_method, stage_budgets
from .runs import (Context, code_hash, evaluate, id_val_score, load_run_config,
                   lpft_endpoints)
from .variants import method_config

__all__ = ['ALPHAS', 'wise_ft']

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


def wise_ft(ctx: Context, lpft: Point, probe: Point, seeds: Sequence[int],
            alphas: Sequence[float] = ALPHAS) -> Tuple[float, List[Dict[str, Any]],
                                                       Dict[str, List[float]]]:
    """(the chosen ``alpha``, each seed's full result at it, ID-val per ``alpha`` and seed)."""
    from daft_mm.core import mix_with_statistics
    from daft_mm.mm.plan import split_model
    from daft_mm.mm.preparation import mm_forward
    from daft_mm.mm.safe_load import load_checkpoint_file
    model, cfg = _model(ctx)
    net = split_model(model)[1]
    root = ctx.work_dir / 'runs' / NAME
    ends = {seed: lpft_endpoints(ctx, lpft, probe, seed) for seed in seeds}

    def mixed(seed: int, alpha: float) -> None:
        start, end = (load_checkpoint_file(str(p), map_location='cpu')['state_dict']
                      for p in ends[seed])
        with _seeded(seed):  # the pipeline's random augmentations: the same on every rerun
            mix_with_statistics(net, start, end, alpha, _train_batches(ctx, cfg, seed),
                                forward=mm_forward('loss'))

    def key(seed: int, alpha: float, what: str) -> str:
        return stable_hash(dict(what=what, seed=seed, alpha=alpha, code=code_hash(),
                                task=ctx.task_key, ends=[str(p) for p in ends[seed]],
                                lpft=lpft.to_dict(), probe=probe.to_dict()))

    def computed(seed: int, alpha: float, what: str, compute: Callable[[], Any]) -> Any:
        """The cached value of ``what`` for this seed and alpha, else computed on the mix."""
        k = key(seed, alpha, what)
        path = root / f'{k}.json'
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get('key') == k:
                return saved['result']
        mixed(seed, alpha)
        value = compute()
        atomic_write_json(str(path), dict(key=k, result=value), default=str)
        return value

    def full(seed: int, alpha: float) -> Dict[str, Any]:
        result = evaluate(model, ctx)
        result.update(method=NAME, setting=dict(alpha=alpha), seed=seed,
                      budgets=stage_budgets(get_method('LP-FT'), ctx.task.budget,
                                            ctx.task.lp_fraction),  # LP-FT's: no more
                      lp_setting=probe.to_dict(), lpft_setting=lpft.to_dict())
        return result

    id_val = {f'{alpha:g}': [computed(seed, alpha, 'id_val', lambda: id_val_score(model, ctx))
                             for seed in seeds] for alpha in alphas}
    best = max(alphas, key=lambda a: (sum(id_val[f'{a:g}']) / len(seeds), -a))
    results = [computed(seed, best, 'full', lambda seed=seed: full(seed, best))
               for seed in seeds]
    return best, results, id_val
