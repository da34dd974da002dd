"""Where a training run starts: ``--resume [PATH]`` resolved to a checkpoint (the newest whole
one of the work dir, never a truncated save), or a fresh start that refuses a work dir holding
another run. The helpers of ``tools/train.py``, here so that other front ends and the tests use
them as library functions.
"""
from __future__ import annotations

import os
import os.path as osp
import re
from typing import Any

__all__ = ['resolve_resume', 'newest_whole_checkpoint', 'refuse_finished_work_dir',
           'launch_rank']


def resolve_resume(cfg: Any, resume: str | None) -> str | None:
    """Sets ``cfg.resume`` / ``cfg.load_from`` for ``--resume [PATH]``; returns what to log.

    Auto-resume (``--resume`` without a path) takes the latest checkpoint of the work dir. When
    there is none yet (a run killed before its first save, e.g. during DAFT's BN conversion), it
    starts over from the config's ``load_from``, not from the init weights: upstream tools set
    ``load_from = None`` here and would silently train from the wrong weights.
    """
    from mmengine.runner import find_latest_checkpoint

    if resume is None:
        return None
    if resume != 'auto':  # an explicit checkpoint wins over auto-resume from the work dir
        cfg.resume = True
        cfg.load_from = resume
        return f'--resume: resuming from {resume}'
    latest = find_latest_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
    if latest:
        if not osp.isfile(latest):
            raise FileNotFoundError(
                f'--resume: {osp.join(cfg.work_dir, "last_checkpoint")} names {latest}, which does '
                'not exist (moved or deleted?). Fix: --resume PATH with the checkpoint to resume, '
                'or delete that last_checkpoint file to start over')
        chosen, skipped = newest_whole_checkpoint(cfg.work_dir, latest)
        if chosen is None:
            raise RuntimeError(
                f'--resume: no checkpoint in {cfg.work_dir} is whole ({", ".join(skipped)} are '
                'truncated or corrupt). Fix: --resume PATH with a good copy, or start over in '
                'another --work-dir')
        cfg.resume = True
        cfg.load_from = chosen
        if skipped:
            return (f'--resume: the latest checkpoint {latest} is truncated or corrupt (a save '
                    f'cut off?); skipped {", ".join(skipped)} and resuming from the newest whole '
                    f'one, {chosen}')
        return f'--resume: resuming from the latest checkpoint of the work dir, {latest}'
    cfg.resume = False
    load_from = cfg.get('load_from')
    if load_from:
        return (f'--resume: no checkpoint in {cfg.work_dir} yet (the run stopped before its first '
                f'save), so this run starts over from load_from={load_from}, as the first one did')
    return (f'--resume: no checkpoint in {cfg.work_dir} yet and no load_from, so this run starts '
            'over from the initial weights (init_cfg), as the first one did')


#: the checkpoints mmengine's CheckpointHook saves
_CHECKPOINT = re.compile(r'(?:iter|epoch)_(\d+)\.pth$')


def _run_checkpoints(work_dir: str) -> list[str]:
    return [name for name in os.listdir(work_dir) if _CHECKPOINT.match(name)]


def _is_whole(path: str) -> bool:
    """A torch checkpoint (a zip archive) whose central directory, written last, is there."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_whole_checkpoint(work_dir: str, latest: str) -> tuple[str | None, list[str]]:
    """``latest`` if it is whole, else the newest whole ``iter_N`` / ``epoch_N`` checkpoint of
    the work dir; and the names of the ones skipped on the way."""
    others = sorted(_run_checkpoints(work_dir), key=lambda n: int(_CHECKPOINT.match(n)[1]),
                    reverse=True)
    candidates = [latest] + [osp.join(work_dir, n) for n in others
                             if not osp.samefile(osp.join(work_dir, n), latest)]
    skipped = []
    for path in candidates:
        if _is_whole(path):
            return path, skipped
        skipped.append(osp.basename(path))
    return None, skipped


#: what a run leaves in its work dir that a second, fresh run would overwrite
_RUN_FILES = ('last_checkpoint', 'converted.pth')


def refuse_finished_work_dir(work_dir: str) -> None:
    """A fresh run (no ``--resume``) into a work dir that holds another run's checkpoints would
    overwrite ``converted.pth`` and ``iter_N.pth`` and move ``last_checkpoint`` back, leaving a
    folder that mixes two runs. Refused, naming the ways on."""
    if not osp.isdir(work_dir):
        return
    found = [name for name in _RUN_FILES if osp.exists(osp.join(work_dir, name))]
    found += sorted(_run_checkpoints(work_dir))
    if not found:
        return
    shown = ', '.join(found[:5]) + (f' and {len(found) - 5} more' if len(found) > 5 else '')
    raise FileExistsError(
        f'work dir {work_dir!r} holds an earlier run ({shown}); a fresh run there would '
        'overwrite its checkpoints and mix the two runs. Fix: --resume to continue it, '
        '--work-dir <another folder> to start a separate run, or, to start over in this one, '
        f'move or delete its checkpoints first (e.g. rm {osp.join(work_dir, "*.pth")} '
        f'{osp.join(work_dir, "last_checkpoint")})')


def launch_rank(launcher: str) -> int:
    """This process's global rank as its launcher tells it, before any process group exists."""
    variable = {'pytorch': 'RANK', 'slurm': 'SLURM_PROCID', 'mpi': 'OMPI_COMM_WORLD_RANK'}
    return int(os.environ.get(variable.get(launcher, ''), '0'))
