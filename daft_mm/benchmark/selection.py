"""Choosing a method's setting on ID validation data: a grid, widened at its edges, then finalists
re-run with more seeds. Pure logic over a ``score(point, seed)`` callable, so it is tested without
training anything and works for any method or framework.

Why each step: a grid whose best point lies on its edge has not found the optimum (the next value
out may be better), so the grid grows along that axis until the best point is inside or a limit is
reached (reported, never hidden). One seed ranks the grid; neighbouring points often differ by
less than the seed noise, so the top few are re-run with more seeds and the best *mean* wins.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .methods import Point

__all__ = ['Axis', 'SearchResult', 'BatchScore', 'one_at_a_time', 'grid_search']


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


@dataclass
class SearchResult:
    """Every evaluated point with its ID-val score per seed, and the choice."""

    scores: Dict[Point, Dict[int, float]] = field(default_factory=dict)
    chosen: Optional[Point] = None
    finalists: List[Point] = field(default_factory=list)
    widened: List[str] = field(default_factory=list)
    on_edge: List[str] = field(default_factory=list)  # axes still best at an edge at the end

    def mean(self, point: Point) -> float:
        values = list(self.scores[point].values())
        return sum(values) / len(values)

    def to_dict(self) -> Dict[str, Any]:
        return {
            'chosen': None if self.chosen is None else self.chosen.to_dict(),
            'finalists': [p.to_dict() for p in self.finalists],
            'widened': list(self.widened),
            'best_on_edge': list(self.on_edge),
            'grid': [dict(p.to_dict(), id_val={str(s): v for s, v in sorted(by_seed.items())},
                          id_val_mean=self.mean(p)) for p, by_seed in self.scores.items()],
        }


def _rank_key(score: float) -> float:
    return -math.inf if not math.isfinite(score) else score  # a diverged run ranks last


#: Scores a batch of (setting, seed) pairs at once, so independent runs can run side by side.
BatchScore = Callable[[List[Tuple[Point, int]]], List[float]]


def one_at_a_time(score: Callable[[Point, int], float]) -> BatchScore:
    """A batch scorer from a scorer of one (setting, seed)."""
    return lambda pairs: [score(point, seed) for point, seed in pairs]


def grid_search(score: BatchScore, axes: Sequence[Axis], *, base: Point = Point(lr=0.0),
                seeds: Sequence[int] = (0, 1, 2), finalists: int = 2, max_widen: int = 3,
                log: Optional[Callable[[str], None]] = None) -> SearchResult:
    """Evaluate the grid ``axes`` (other fields from ``base``) with ``seeds[0]``; widen each
    numeric axis by its ``step`` while the best point is on its edge (at most ``max_widen`` new
    values per axis, tried on the line through the best point; all axes at an edge in one batch;
    never below an axis's ``floor``);
    then re-run the top ``finalists`` with every seed and choose the best mean ID-val score."""
    if not seeds:
        raise ValueError('grid_search needs at least one seed')
    result = SearchResult()
    first = seeds[0]

    def run(pairs: List[Tuple[Point, int]]) -> None:
        todo = list(dict.fromkeys(pair for pair in pairs
                                  if pair[1] not in result.scores.get(pair[0], {})))
        for (point, seed), value in zip(todo, score(todo)):
            result.scores.setdefault(point, {})[seed] = float(value)
            if log is not None:
                log(f'{point.label()} seed {seed}: ID-val {value:.2f}')

    values = {axis.name: list(axis.values) for axis in axes}
    run([(replace(base, **dict(zip(values, combo))), first)
         for combo in itertools.product(*(values[a.name] for a in axes))])

    def best() -> Point:
        return max(result.scores, key=lambda p: _rank_key(result.scores[p][first]))

    grown = {axis.name: 0 for axis in axes}
    while True:
        top = best()
        batch = []
        for axis in axes:
            if axis.step is None or grown[axis.name] >= max_widen:
                continue
            current, known = getattr(top, axis.name), values[axis.name]
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
                batch.append((replace(top, **{axis.name: value}), first))
        if not batch:
            break
        run(batch)
    ranked = sorted(result.scores, key=lambda p: _rank_key(result.scores[p][first]),
                    reverse=True)
    result.finalists = ranked[:max(1, finalists)]
    run([(point, seed) for point in result.finalists for seed in seeds[1:]])
    result.chosen = top = max(result.finalists, key=lambda p: _rank_key(result.mean(p)))
    # The choice (after the finalists' seeds) may still sit on an edge: said, not hidden.
    result.on_edge = [axis.name for axis in axes
                      if axis.step is not None and len(values[axis.name]) > 1
                      and (getattr(top, axis.name) == max(values[axis.name])
                           or getattr(top, axis.name) == min(values[axis.name])
                           and axis.can_go_below(getattr(top, axis.name)))]
    return result
