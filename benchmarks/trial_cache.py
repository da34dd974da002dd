"""Carry a comparison's finished trials from one machine to the next, through the repository.

A study on 2 CPU cores outlasts a session, and the machine (with the work dir) is not kept between
sessions. Its trials are cached as small JSON files keyed by everything a run depends on (the
task, the code, the start checkpoint, the setting and seed; :mod:`daft_mm.benchmark.runs`), so
copying those files into the repository and back lets the next session's run pick up where this
one stopped. Checkpoints are never copied: a trial promoted past a rung whose checkpoint is gone
trains that prefix again, which the cache already allows.

    python benchmarks/trial_cache.py save WORK_DIR benchmarks/trials/NAME
    python benchmarks/trial_cache.py restore benchmarks/trials/NAME WORK_DIR

The keys hold the task's absolute data root and the hash of the code under
``daft_mm/{core,mm,benchmark,utils}`` (code older than 4c4567a: WiSE-FT's keys also hold the work
dir's path): restore with the data at the same place, and run with code of the same hash (the
manifest records it and the commit it was saved from), or the copied trials are silently not
reused. Run this script with the study's code importable (``PYTHONPATH=<the study's
worktree>``): the hash, commit and checkout (``code_dir``) it records are that code's. Code older
than 82c77e2 also hashes the backbone checkpoint's absolute path, which lies inside the checkout:
resume such a study from a worktree at the same ``code_dir`` (``resume_study.sh`` does).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

try:  # the installed daft_mm, or the one on PYTHONPATH (a study's worktree) ...
    import daft_mm
except ImportError:  # ... else this checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import daft_mm
from daft_mm.benchmark.runs import code_hash  # noqa: E402
from daft_mm.utils import atomic_write_json  # noqa: E402

#: the checkout whose code runs: the installed one, or the one on PYTHONPATH (a study's worktree)
CODE = Path(daft_mm.__file__).resolve().parents[1]

MANIFEST = 'manifest.json'
#: a stage-1 marker is only reused next to its checkpoint, which is not carried
_SKIP = {'done.json'}


def trial_files(work_dir: Path) -> List[Path]:
    """The results worth carrying, relative to ``work_dir``: every JSON under ``runs/`` (final
    results, rungs, WiSE-FT's mixes) and the search record."""
    runs = work_dir / 'runs'
    # runs/<method>/<key>/*.json, runs/WiSE-FT/*.json; never a log of a run still training
    files = [p for p in runs.rglob('*.json')
             if p.name not in _SKIP and len(p.relative_to(runs).parts) <= 3]
    files += [p for p in [work_dir / 'search.json'] if p.is_file()]
    return sorted(p.relative_to(work_dir) for p in files)


def trial_seconds(root: Path, files: Sequence[Path]) -> float:
    """The time the trials took, summed over every part of every trial (a rung, the rest of a
    promoted run, a run to the end): what a study cost, whatever sessions it ran in. A report
    records only its last invocation's time; a trial runs on one core, so this is core-seconds
    (inflated when more processes than cores ran)."""
    total = 0.0
    for rel in files:
        try:
            result = json.loads((root / rel).read_text()).get('result')
        except ValueError:
            continue
        if isinstance(result, dict) and isinstance(result.get('seconds'), (int, float)):
            total += result['seconds']
    return total


def _commit() -> Optional[str]:
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=CODE, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def save(work_dir: Path, dest: Path) -> int:
    files = trial_files(work_dir)
    if not files:
        raise SystemExit(f'{work_dir} holds no trial results (runs/**/*.json): is it the work dir '
                         'of a tools/compare.py run?')
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work_dir / rel, dest / rel)
    atomic_write_json(str(dest / MANIFEST), dict(
        work_dir=str(work_dir.resolve()), code_hash=code_hash(), commit=_commit(),
        code_dir=str(CODE),
        files=len(files), results=sum(f.name == 'result.json' for f in files),
        trial_seconds=round(trial_seconds(dest, files), 1)), indent=1)
    return len(files)


def restore(src: Path, work_dir: Path) -> int:
    manifest_file = src / MANIFEST
    if not manifest_file.is_file():
        raise SystemExit(f'{manifest_file} does not exist: restore from a folder written by '
                         '`trial_cache.py save`')
    manifest = json.loads(manifest_file.read_text())
    if manifest['code_hash'] != code_hash():
        raise SystemExit(
            f'the trials in {src} were made by other code (hash {manifest["code_hash"]}, commit '
            f'{manifest.get("commit")}; this checkout: {code_hash()}): they would not be reused. '
            f'Fix: run from a worktree of that commit (git worktree add DIR '
            f'{manifest.get("commit")}) with PYTHONPATH=DIR')
    if str(work_dir.resolve()) != manifest['work_dir']:
        print(f'[trial_cache] note: saved from {manifest["work_dir"]}; code older than 4c4567a '
              'reuses WiSE-FT\'s mixes only there', file=sys.stderr)
    copied = 0
    for path in sorted(src.rglob('*.json')):
        rel = path.relative_to(src)
        if rel.as_posix() == MANIFEST or (work_dir / rel).is_file():
            continue  # never overwrite what this machine has made since
        (work_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, work_dir / rel)
        copied += 1
    return copied


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('save', help='copy a work dir\'s trial results into a folder')
    s.add_argument('work_dir', type=Path)
    s.add_argument('dest', type=Path)
    r = sub.add_parser('restore', help='copy saved trial results back into a work dir')
    r.add_argument('src', type=Path)
    r.add_argument('work_dir', type=Path)
    args = p.parse_args(argv)
    if args.cmd == 'save':
        print(f'[trial_cache] saved {save(args.work_dir, args.dest)} files to {args.dest}')
    else:
        print(f'[trial_cache] restored {restore(args.src, args.work_dir)} files to {args.work_dir}')


if __name__ == '__main__':
    main()
