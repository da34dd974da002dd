"""The stock LR schedules with DAFT's head/backbone LR ratio kept to the end.

Why: PolyLR (every stock mmseg schedule, ``eta_min=1e-4``) and CosineAnnealingLR with an
absolute ``eta_min`` pull every parameter group towards the same LR, so by the end of training
the head trains at the backbone's LR and the ratio DAFT depends on is gone. Here the floor of
each group becomes ``eta_min x`` that group's LR over the base LR: the backbone's floor is the
configured ``eta_min``, the head's ``eta_min x daft_head_lr_mult``, and the ratio holds at every
step. The schedulers stay mmengine's (their checkpoint state included); only the floor changes.
"""
from __future__ import annotations

from typing import Any, List, Sequence

from mmengine.optim.scheduler import (CosineAnnealingLR, CosineRestartLR, PolyLR)

__all__ = ['PolyLRGroupFloors', 'keep_lr_ratio']


class PolyLRGroupFloors(PolyLR):
    """``PolyLR`` with one floor per parameter group (``eta_mins``), set by
    :func:`keep_lr_ratio` on a built ``PolyLR``; its state dict then holds the floors."""

    eta_mins: List[float]

    def _get_value(self) -> List[float]:
        groups = self.optimizer.param_groups
        if self.last_step == 0:
            return [group[self.param_name] for group in groups]
        decay = (1 - 1 / (self.total_iters - self.last_step + 1))**self.power
        return [(group[self.param_name] - floor) * decay + floor
                for group, floor in zip(groups, self.eta_mins)]


def _base_lr(scheduler: Any) -> float:
    """The LR the floors are relative to: the optimizer's configured LR (the backbone's)."""
    lr = scheduler.optimizer.defaults.get('lr')
    if isinstance(lr, (int, float)) and lr > 0:
        return float(lr)
    return min(v for v in scheduler.base_values if v > 0)


def keep_lr_ratio(schedulers: Sequence[Any]) -> List[str]:
    """Give every LR scheduler with an absolute floor one floor per parameter group, in place;
    returns one line per changed scheduler. A scheduler with an absolute floor of another kind
    cannot be changed here: a ``ValueError`` names it and the fix."""
    notes = []
    for i, sched in enumerate(schedulers):
        eta_min = getattr(sched, 'eta_min', None)
        if getattr(sched, 'param_name', None) != 'lr' or not eta_min:
            continue
        if getattr(sched, 'eta_min_ratio', None) is not None:
            continue
        if len(set(sched.base_values)) < 2:
            continue  # one LR for every group: nothing to keep
        base = _base_lr(sched)
        name = type(sched).__name__
        if isinstance(sched, PolyLR):
            sched.__class__ = PolyLRGroupFloors
            sched.eta_mins = [eta_min * value / base for value in sched.base_values]
        elif isinstance(sched, (CosineAnnealingLR, CosineRestartLR)):
            sched.eta_min, sched.eta_min_ratio = None, eta_min / base
        else:
            raise ValueError(
                f'param_scheduler[{i}] ({name}, eta_min={eta_min:g}) decays every param group '
                f'to the same absolute lr {eta_min:g}, which erases the head/backbone LR ratio '
                'by the end of training, and daft-mm cannot give it one floor per group. Fix: '
                'eta_min=0, or PolyLR / CosineAnnealingLR (their floors are kept per group)')
        notes.append(f'param_scheduler[{i}] ({name}): eta_min={eta_min:g} is now a floor per '
                     f'param group ({eta_min:g} x the group\'s LR / base LR {base:g}), so the '
                     'head/backbone LR ratio holds to the end')
    return notes
