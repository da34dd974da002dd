"""The benchmark's generated data: street scenes in the real Cityscapes layout, in several looks.

* **source** (pretraining): many random looks, labelled with the 7 coarse Cityscapes *categories*
  (flat, construction, object, nature, sky, human, vehicle), not the 19 target classes: the
  pretrained backbone comes from another label space, so every method needs a new decode head,
  as when an ImageNet backbone is fine-tuned for segmentation;
* **ID target**: one narrow look, 19-class labels (train / ID-val / ID-test);
* **OOD targets**: other looks of the *same scenes* as the ID test (only the look differs), and the
  ID test under common corruptions (seeded ``ImageCorruption`` in the test pipeline).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = ['ID_STYLE', 'OOD_STYLES', 'COARSE_CATEGORIES', 'COARSE_OF_TRAIN_ID', 'Settings',
           'DEFAULT', 'QUICK', 'DataRoots', 'make_data', 'source_styles', 'stable_hash',
           'file_hash', 'source_commit']

REPO = Path(__file__).resolve().parents[2]

#: The ID target: one narrow look (muted, slightly cool, lower contrast).
ID_STYLE: Dict[str, Any] = dict(saturation=0.6, brightness=0.95, contrast=0.85,
                                color_shift=(-6.0, 0.0, 12.0))
#: OOD targets: other looks of the same scenes as the ID test set.
OOD_STYLES: Dict[str, Dict[str, Any]] = {
    'night': dict(brightness=0.4, saturation=0.7, color_shift=(-4.0, 0.0, 16.0), noise_std=4.0),
    'haze': dict(contrast=0.4, color_shift=(85.0, 85.0, 90.0), blur_sigma=0.8),
    'sunset': dict(saturation=1.3, color_shift=(45.0, 8.0, -40.0)),
}
#: Cityscapes' own category grouping of its 19 train ids.
COARSE_CATEGORIES = ('flat', 'construction', 'object', 'nature', 'sky', 'human', 'vehicle')
COARSE_OF_TRAIN_ID: Tuple[int, ...] = (0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6)


@dataclass(frozen=True)
class Settings:
    """Everything that decides the data, the pretrained backbone and the fine-tuning runs."""
    size: Tuple[int, int] = (64, 128)
    gen_seed: int = 0
    source_styles: int = 8
    source_per_style: int = 24
    id_train: int = 48
    id_val: int = 24
    test: int = 32
    corruptions: Tuple[Tuple[str, int], ...] = (('gaussian_noise', 3), ('motion_blur', 3),
                                                ('fog', 3))
    pretrain_iters: int = 600
    pretrain_lr: float = 0.05
    budget: int = 300  # fine-tuning iterations of every method (LP-FT: both stages together)
    lp_fraction: float = 0.5  # LP-FT's probe stage share of the budget
    batch_size: int = 8
    seeds: Tuple[int, ...] = (0, 1, 2)

    def data_key(self) -> str:
        fields = ('size', 'gen_seed', 'source_styles', 'source_per_style', 'id_train', 'id_val',
                  'test')
        spec = {k: getattr(self, k) for k in fields}
        spec.update(id_style=ID_STYLE, ood_styles=OOD_STYLES, source_labels=COARSE_OF_TRAIN_ID,
                    generator=file_hash(REPO / 'daft_mm' / 'mm' / 'datasets' / 'synthetic.py'))
        return stable_hash(spec)

    def pretrain_key(self) -> str:
        demo = REPO / 'configs' / 'demo'
        spec = dict(data=self.data_key(), iters=self.pretrain_iters, lr=self.pretrain_lr,
                    batch_size=self.batch_size,
                    configs=[file_hash(demo / 'pretrain_demo.py'),
                             file_hash(demo / '_base_' / 'demo_common.py')])
        return stable_hash(spec)


DEFAULT = Settings()
QUICK = Settings(source_styles=3, source_per_style=4, id_train=8, id_val=4, test=4,
                 corruptions=(('gaussian_noise', 3), ), pretrain_iters=6, budget=4,
                 batch_size=4, seeds=(0, ))


def stable_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def repo_commit(repo: Path = REPO) -> str:
    """The checkout's commit (with ``+changes`` when its tracked files differ), for provenance."""
    import subprocess
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=repo, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return (head or 'unknown') + ('+changes' if dirty.strip() else '')


def file_hash(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:10] if path.is_file() else 'missing'


def source_repository(root: Path) -> Optional[str]:
    """The repository the data came from (``owner/name``), as a ``.source_repository`` file in
    ``root`` or a folder above says (written next to ``.source_commit`` when extracting)."""
    for folder in [root, *root.parents]:
        marker = folder / '.source_repository'
        if marker.is_file():
            return marker.read_text().strip()
    return None


def source_commit(root: Path) -> Optional[str]:
    """The commit of the repository the data came from, as a ``.source_commit`` file in ``root``
    or a folder above says (write it when extracting: ``git -C <mirror> rev-parse HEAD``); None
    when there is none."""
    for folder in [root, *root.parents]:
        marker = folder / '.source_commit'
        if marker.is_file():
            return marker.read_text().strip()
    return None


@dataclass
class DataRoots:
    source: str
    id: str  # train: ID training, val: ID test
    id_val: str  # val: ID validation (every choice of a setting)
    ood: Dict[str, str] = field(default_factory=dict)  # name -> root (val split)


def source_styles(n: int, seed: int) -> List[Dict[str, Any]]:
    """``n`` random looks for the source set: colours, class palette, contrast, noise, blur."""
    from daft_mm.mm.datasets.synthetic import _CS_COLORS  # the generator's class colours
    rng = np.random.default_rng([seed, 7919])
    styles = []
    for _ in range(n):
        palette = {cls: tuple(float(v) for v in np.clip(np.asarray(rgb) + rng.uniform(-40, 40, 3),
                                                          0, 255))
                   for cls, rgb in _CS_COLORS.items()}
        styles.append(dict(
            palette=palette, brightness=float(rng.uniform(0.5, 1.3)),
            contrast=float(rng.uniform(0.5, 1.2)), saturation=float(rng.uniform(0.4, 1.4)),
            color_shift=tuple(float(v) for v in rng.uniform(-40, 40, 3)),
            noise_std=float(rng.uniform(0, 5)), blur_sigma=float(rng.uniform(0, 1.0))))
    return styles


def _relabel_coarse(root: Path) -> int:
    """Rewrite every label map under ``root/gtFine`` from train ids to coarse categories."""
    import cv2
    lut = np.full(256, 255, dtype=np.uint8)
    lut[:len(COARSE_OF_TRAIN_ID)] = COARSE_OF_TRAIN_ID
    files = sorted((root / 'gtFine').rglob('*_gtFine_labelTrainIds.png'))
    for path in files:
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if label is None or not cv2.imwrite(str(path), lut[label]):
            raise OSError(f'cannot relabel {path}')
    return len(files)


def make_data(root: Path, s: Settings, step: Callable[[str], None]) -> DataRoots:
    """Generate (or reuse) every set; a ``.complete`` file marks a finished generation."""
    from daft_mm.mm.datasets import make_cityscapes
    roots = DataRoots(source=str(root / 'source'), id=str(root / 'id'),
                      id_val=str(root / 'id_val'),
                      ood={name: str(root / f'ood_{name}') for name in OOD_STYLES})
    marker = root / '.complete'
    if marker.is_file():
        step(f'data: reusing {root}')
        return roots
    t0 = time.time()
    if root.exists():
        shutil.rmtree(root)  # an interrupted generation
    test_seed, val_seed = s.gen_seed + 100, s.gen_seed + 200
    for k, style in enumerate(source_styles(s.source_styles, s.gen_seed)):
        make_cityscapes(roots.source, num_train=s.source_per_style, num_val=0, size=s.size,
                        seed=s.gen_seed + 1000 + k, style=style,
                        cities={'train': (f'source{k:02d}', )})
    _relabel_coarse(Path(roots.source))
    make_cityscapes(roots.id, num_train=s.id_train, num_val=s.test, size=s.size, seed=test_seed,
                    style=ID_STYLE)
    make_cityscapes(roots.id_val, num_train=0, num_val=s.id_val, size=s.size, seed=val_seed,
                    style=ID_STYLE)
    for name, style in OOD_STYLES.items():  # same seed as the ID test: same scenes, other look
        make_cityscapes(roots.ood[name], num_train=0, num_val=s.test, size=s.size, seed=test_seed,
                        style=style)
    marker.write_text(json.dumps(asdict(s), indent=1, default=str))
    n = (s.source_styles * s.source_per_style + s.id_train + s.id_val
         + s.test * (1 + len(OOD_STYLES)))
    step(f'data: {n} images generated in {time.time() - t0:.1f}s under {root}')
    return roots
