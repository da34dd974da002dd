"""Publish a comparison's report (``tools/compare.py`` / ``tools/demo.py`` work dir) under
``benchmarks/results/<name>.{json,md,png}``, re-rendered so the Markdown links its own figure.
The numbers are the report's: nothing is re-run. A report without the data's provenance gets it
here, read from the sets and backbone as they are on this machine. ``--floor``: the image-blind
floor ``image_blind_floor.py`` computed for the same task and data, added as a row (for a report
whose code did not compute it).

    python benchmarks/publish_report.py work_dirs/compare/camvid_day_dusk camvid
    python benchmarks/publish_report.py WORK/camvid_boxes_study camvid_boxes \\
        --floor benchmarks/results/camvid_boxes_floor.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daft_mm.benchmark.experiment import attach_floor, write_report  # noqa: E402
from daft_mm.benchmark.task import provenance  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('work_dir', help='the work dir holding report.json')
    p.add_argument('name', help='the stem under --out-dir, e.g. camvid')
    p.add_argument('--out-dir', default=str(REPO / 'benchmarks' / 'results'))
    p.add_argument('--floor', metavar='JSON', default=None,
                   help='the image-blind floor of the same task (image_blind_floor.py)')
    args = p.parse_args(argv)
    report_file = Path(args.work_dir) / 'report.json'
    if not report_file.is_file():
        p.error(f'{report_file} does not exist: run tools/compare.py (or tools/demo.py) first')
    report = json.loads(report_file.read_text())
    if 'provenance' not in report:  # a report from before reports recorded it: read it now
        report['provenance'] = dict(provenance(report['task']), recorded='when published')
    if args.floor:
        try:
            report = attach_floor(report, json.loads(Path(args.floor).read_text()))
        except ValueError as err:
            p.error(f'--floor {args.floor}: {err}')
    write_report(portable(report, Path(args.work_dir)), Path(args.out_dir), args.name)


#: Folders of a checkout: a path through one of them is written from there on.
_CHECKOUT = ('configs', 'benchmarks', 'tests', 'daft_mm', 'tools', 'work_dirs')


def portable(obj: Any, work_dir: Path) -> Any:
    """The report without this machine's absolute paths: files of a checkout relative to it,
    the work dir as ``<work_dir>``, a data root as ``data/<its name>``, any other folder as
    ``<local>`` (the data's repository and commit are in the provenance)."""
    work = str(Path(work_dir).resolve())
    if isinstance(obj, dict):
        return {k: (f'data/{Path(v).name}' if k == 'data_root' and isinstance(v, str)
                    and v.startswith('/') else portable(v, work_dir)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, work_dir) for v in obj]
    if not isinstance(obj, str) or '/' not in obj:
        return obj
    obj = obj.replace(work, '<work_dir>')
    obj = re.sub(r'/[^\s\'"()]*?/(' + '|'.join(_CHECKOUT) + r')/', r'\1/', obj)
    # anything else of this machine (another work dir, a dataset folder): its last name only
    return re.sub(r'(?<![\w.<>-])/(?:[\w.-]+/)+', '<local>/', obj)


if __name__ == '__main__':
    main()
