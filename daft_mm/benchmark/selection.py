"""Choosing a method's setting on ID validation data: a grid, widened at its edges, pruned by
successive halving, then finalists re-run with more seeds. Pure logic: a search is a generator of
trials to run and is sent their scores, so it is tested without training anything, works for any
method or framework, and leaves where the trials run to whoever drives it.

Why each step: a grid whose best point lies on its edge has not found the optimum (the next value
out may be better), so the grid grows along that axis until the best point is inside or a limit is
reached (reported, never hidden). One seed ranks the grid; neighbouring points often differ by
less than the seed noise, so the top few are re-run with more seeds and the best *mean* wins.
Successive halving: a point far behind after a ninth of the budget rarely wins at the end, so
only the best third goes on at each rung; at a budget of hours this is what makes the search
affordable.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Tuple

from .methods import Point

__all__ = ['Axis', 'Trial', 'SearchResult', 'BatchScore', 'Steps', 'one_at_a_time', 'drive',
           'halving_rungs', 'grid_search', 'search_steps']


@dataclass(frozen=True)
class Axis:
    """One searched setting: ``name`` is a field of :class:`Point` ('lr', 'ratio', 'scope');
    ``step`` (a factor > 1) lets a numeric axis grow past its edges, ``None`` keeps it fixed.
    ``floor`` (optional) is the lowest value widening may try: a widened value below it is not
    tried, and the axis then no longer widens (nor counts as on the edge) at its lower side."""

    name: str
    values: Tuple[Any, ...]
    step: Optional[float] = None
    floor: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError(f'axis {self.name!r} has no values')
        if self.step is not None and not self.step > 1:
            raise ValueError(f'axis {self.name!r}: step must be > 1, got {self.step!r}')
        if self.floor is not None and any(value < self.floor for value in self.values):
            raise ValueError(f'axis {self.name!r}: values below its floor {self.floor!r}')

    def can_go_below(self, value: Any) -> bool:
        """Whether widening may try ``value / step`` (not under the floor)."""
        return self.floor is None or value / self.step >= self.floor


@dataclass(frozen=True)
class Trial:
    """One training run a search asks for: ``point`` with ``seed`` trained to ``iters``
    iterations (``None``: the budget) under the schedule of the *whole* budget, continuing from
    its own checkpoint at ``start`` iterations (0: from the pretrained start). A run stopped at a
    rung is therefore an exact prefix of the full run."""

    point: Point
    seed: int
    iters: Optional[int] = None
    start: int = 0


@dataclass
class SearchResult:
    """Every evaluated point with its ID-val score per seed at the full budget, the first seed's
    score at every rung it reached (successive halving), what the search cost, and the choice."""

    scores: Dict[Point, Dict[int, float]] = field(default_factory=dict)
    chosen: Optional[Point] = None
    finalists: List[Point] = field(default_factory=list)
    widened: List[str] = field(default_factory=list)
    on_edge: List[str] = field(default_factory=list)  # axes still best at an edge at the end
    rungs: List[Optional[int]] = field(default_factory=lambda: [None])
    reached: Dict[Point, Dict[Optional[int], float]] = field(default_factory=dict)
    #: iterations the search asked for (cached or not): the first seed's runs before the
    #: finalists (``grid``), the finalists' continuation and other seeds (``finalists``)
    iterations: Dict[str, int] = field(default_factory=lambda: {'grid': 0, 'finalists': 0})
    runs: Dict[str, int] = field(default_factory=lambda: {'grid': 0, 'finalists': 0})

    def mean(self, point: Point) -> float:
        values = list(self.scores[point].values())
        return sum(values) / len(values)

    def to_dict(self) -> Dict[str, Any]:
        grid = []
        for p in self.reached:
            row = dict(p.to_dict())
            if p in self.scores:
                row.update(id_val={str(s): v for s, v in sorted(self.scores[p].items())},
                           id_val_mean=self.mean(p))
            if len(self.rungs) > 1:
                row['rungs'] = {str(it): v for it, v in self.reached[p].items()}
                if p not in self.scores:
                    row['stopped_at'] = max(self.reached[p])
            grid.append(row)
        return {
            'chosen': None if self.chosen is None else self.chosen.to_dict(),
            'finalists': [p.to_dict() for p in self.finalists],
            'widened': list(self.widened),
            'best_on_edge': list(self.on_edge),
            'rungs': list(self.rungs),
            'points': len(self.reached),
            'iterations': dict(self.iterations),
            'runs': dict(self.runs),
            'grid': grid,
        }


def _rank_key(score: float) -> float:
    return -math.inf if not math.isfinite(score) else score  # a diverged run ranks last


#: Scores a batch of (setting, seed) pairs at once, so independent runs can run side by side.
BatchScore = Callable[[List[Tuple[Point, int]]], List[float]]
#: A search as a generator: it yields the trials it needs next (independent of each other) and
#: is sent their ID-val scores in the same order; it returns its :class:`SearchResult`. Whoever
#: drives it (a loop here, Ray Tune in :mod:`daft_mm.benchmark.engine`) decides where they run.
Steps = Generator[List[Trial], List[float], SearchResult]


def one_at_a_time(score: Callable[[Point, int], float]) -> BatchScore:
    """A batch scorer from a scorer of one (setting, seed)."""
    return lambda pairs: [score(point, seed) for point, seed in pairs]


def drive(steps: Generator[List[Any], List[Any], Any],
          run: Callable[[List[Any]], List[Any]]) -> Any:
    """Run a generator of batches to its end with ``run`` (a batch -> its results)."""
    try:
        batch = next(steps)
        while True:
            batch = steps.send(run(batch))
    except StopIteration as stop:
        return stop.value


def halving_rungs(budget: int, eta: int = 3, rungs: int = 3) -> Tuple[int, ...]:
    """Iterations at which successive halving scores the points: ``budget / eta**k`` for
    ``k = rungs-1 .. 0`` (1/9, 1/3 and 1 of the budget by default), at least 1 iteration each,
    duplicates dropped (a tiny budget has fewer rungs)."""
    if eta < 2:
        raise ValueError(f'the reduction factor must be >= 2, got {eta}')
    if rungs < 1:
        raise ValueError(f'successive halving needs >= 1 rung, got {rungs}')
    its = sorted({max(1, budget // eta ** k) for k in range(rungs)})
    return tuple(its)


def grid_search(score: BatchScore, axes: Sequence[Axis], *, base: Point = Point(lr=0.0),
                seeds: Sequence[int] = (0, 1, 2), finalists: int = 2, max_widen: int = 3,
                log: Optional[Callable[[str], None]] = None) -> SearchResult:
    """:func:`search_steps` without halving, every run scored by ``score`` in this process."""
    return drive(search_steps(axes, base=base, seeds=seeds, finalists=finalists,
                              max_widen=max_widen, log=log),
                 lambda trials: score([(t.point, t.seed) for t in trials]))


def search_steps(axes: Sequence[Axis], *, base: Point = Point(lr=0.0),
                 seeds: Sequence[int] = (0, 1, 2), finalists: int = 2, max_widen: int = 3,
                 rungs: Sequence[Optional[int]] = (None, ), eta: int = 3,
                 log: Optional[Callable[[str], None]] = None) -> Steps:
    """Evaluate the grid ``axes`` (other fields from ``base``) with ``seeds[0]``; widen each
    numeric axis by its ``step`` while the best point is on its edge (at most ``max_widen`` new
    values per axis, tried on the line through the best point; all axes at an edge in one batch;
    never below an axis's ``floor``); then run the top ``finalists`` with every seed at the full
    budget and choose the best mean ID-val score.

    ``rungs`` (iterations, ascending, the last the full budget; see :func:`halving_rungs`):
    successive halving. Every point is scored at the first rung; at each rung the best
    ``max(1, n // eta)`` of the ``n`` points scored there go on to the next, continued from their
    rung checkpoint (:class:`Trial` ``start``), as soon as the rule allows (asynchronous
    promotion, as in ASHA: a point added by widening can promote a point it outranks). Points
    rank by the highest rung they reached, then by their score there. The rule depends on the
    scores only, never on which run finished first, so the choice is the same on one core, on
    many GPUs and on a cluster. A run that failed or diverged (a non-finite score) ranks last and
    is never continued."""
    if not seeds:
        raise ValueError('a search needs at least one seed')
    rungs = list(rungs)
    if (None in rungs and len(rungs) > 1) or (None not in rungs and rungs != sorted(set(rungs))):
        raise ValueError(f'rungs must be ascending iterations, or (None,) for no halving; got '
                         f'{rungs}')
    top = rungs[-1]
    result = SearchResult(rungs=rungs)
    first = seeds[0]
    reached = result.reached

    def level(p: Point) -> Tuple[int, float]:
        done = [(rungs.index(it), v) for it, v in reached[p].items() if math.isfinite(v)]
        return max(done) if done else (-1, -math.inf)

    def promotions() -> List[Trial]:
        todo = []
        for k in range(len(rungs) - 1):
            # a point that failed here or higher up leaves its place to the next best
            at = {p: s[rungs[k]] for p, s in reached.items() if rungs[k] in s
                  and all(math.isfinite(v) for it, v in s.items() if rungs.index(it) >= k)}
            n = sum(1 for s in reached.values() if rungs[k] in s)  # failed runs count as scored
            for p in sorted(at, key=at.get, reverse=True)[:max(1, n // eta)]:
                if rungs[k + 1] not in reached[p]:
                    todo.append(Trial(p, first, rungs[k + 1], rungs[k]))
        return todo

    def record(trials: List[Trial], values: List[float], stage: str) -> None:
        for t, value in zip(trials, values):
            value = float(value)
            result.iterations[stage] += (t.iters or 0) - t.start
            result.runs[stage] += 1
            if t.seed == first:
                reached.setdefault(t.point, {})[t.iters] = value
            if t.iters == top:
                result.scores.setdefault(t.point, {})[t.seed] = value
            if log is not None:
                at = '' if t.iters == top else f' at {t.iters} iterations'
                log(f'{t.point.label()} seed {t.seed}{at}: ID-val {value:.2f}')

    def evaluate(points: List[Point]) -> Generator[List[Trial], List[float], None]:
        batch = [Trial(p, first, rungs[0]) for p in dict.fromkeys(points) if p not in reached]
        while batch:
            values = yield batch
            record(batch, values, 'grid')
            batch = promotions()

    values = {axis.name: list(axis.values) for axis in axes}
    yield from evaluate([replace(base, **dict(zip(values, combo)))
                         for combo in itertools.product(*(values[a.name] for a in axes))])

    def best() -> Point:
        return max(reached, key=level)

    grown = {axis.name: 0 for axis in axes}
    while True:
        top_point = best()
        batch = []
        for axis in axes:
            if axis.step is None or grown[axis.name] >= max_widen:
                continue
            current, known = getattr(top_point, axis.name), values[axis.name]
            new = []
            if current == max(known):
                new.append(current * axis.step)
            if current == min(known) and axis.can_go_below(current):  # both ways for one value
                new.append(current / axis.step)
            new = new[:max_widen - grown[axis.name]]
            for value in new:
                known.append(value)
                grown[axis.name] += 1
                result.widened.append(f'{axis.name}={value:g} (best was at the edge '
                                      f'{current:g})')
                batch.append(replace(top_point, **{axis.name: value}))
        if not batch:
            break
        yield from evaluate(batch)
    ranked = sorted(reached, key=level, reverse=True)
    result.finalists = [p for p in ranked[:max(1, finalists)] if level(p)[0] >= 0] or ranked[:1]
    final = []
    for p in result.finalists:
        k = level(p)[0]
        if top not in reached[p] and k >= 0:  # continue its first seed to the full budget
            final.append(Trial(p, first, top, rungs[k]))
        final += [Trial(p, seed, top) for seed in seeds[1:]
                  if seed not in result.scores.get(p, {})]
    if final:
        record(final, (yield final), 'finalists')
    for p in result.finalists:  # a failed finalist still has a (non-finite) full-budget score
        result.scores.setdefault(p, {}).setdefault(first, reached[p].get(top, -math.inf))
    result.chosen = chosen = max(result.finalists, key=lambda p: _rank_key(result.mean(p)))
    # The choice (after the finalists' seeds) may still sit on an edge: said, not hidden.
    result.on_edge = [axis.name for axis in axes
                      if axis.step is not None and len(values[axis.name]) > 1
                      and (getattr(chosen, axis.name) == max(values[axis.name])
                           or getattr(chosen, axis.name) == min(values[axis.name])
                           and axis.can_go_below(getattr(chosen, axis.name)))]
    return result


def halving_cost(points: int, rungs: Sequence[int], *, eta: int = 3, finalists: int = 2,
                 seeds: int = 3) -> Dict[str, int]:
    """The iterations :func:`search_steps` asks for on a grid of ``points`` that does not widen:
    the first seed's runs up the rungs (``grid``) and the finalists' continuation and other
    seeds (``finalists``, counting a finalist below the top as one rung down), and the trials.
    ``rungs=(B,)``: no halving."""
    grid, trials, at, before = 0, 0, points, 0
    for k, rung in enumerate(rungs):
        grid += at * (rung - before)
        trials += at
        before = rung
        if k < len(rungs) - 1:
            at = max(1, at // eta) if at else 0
    final = min(max(1, finalists), points)
    below = max(0, final - at)
    return {'grid': grid, 'trials': trials + below + final * (seeds - 1),
            'finalists': below * (rungs[-1] - (rungs[-2] if len(rungs) > 1 else 0))
            + final * (seeds - 1) * rungs[-1]}
