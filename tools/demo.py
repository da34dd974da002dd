"""The embedded DAFT benchmark: FT, LP, LP-FT, DAFT and DAFT's ablations on generated street
scenes, on 2 CPU cores. A thin command line over :mod:`daft_mm.benchmark.experiment`.

The premise is the method's: a backbone pretrained on another label space (the 7 coarse
Cityscapes categories, many looks), a fresh 19-class decode head for every method, the same
iteration budget for all (LP-FT's two stages share it), 3 seeds, every setting chosen on ID-val.

    python tools/demo.py              # the default: recorded settings, ~15 min on 2 cores
    python tools/demo.py --quick      # reduced run for the tests (~1-2 min)
    python tools/demo.py --search     # choose every setting on ID-val first (about an hour)

Writes report.{json,md,png} to the work dir; --search also writes search.json (copy it to
configs/demo/recorded_search.json to make its choices the default).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from daft_mm.benchmark.experiment import (RECORDED, Options, add_engine_args,  # noqa: E402
                                          check_engine_args, engine_options, run_benchmark)


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 2)[2])
    p.add_argument('--quick', action='store_true',
                   help='reduced run (tiny sets, a few iterations, 1 seed) for tests')
    p.add_argument('--work-dir', default='work_dirs/demo',
                   help='where data, the cached pretrained backbone, runs and the report go')
    p.add_argument('--seeds', type=int, default=None,
                   help='seeds per method (default 3; --quick: 1)')
    p.add_argument('--search', action='store_true',
                   help='choose every method\'s setting on the ID-val split (grids widened at '
                   'their edges, pruned by successive halving, finalists re-run with every '
                   'seed), then report')
    p.add_argument('--search-methods', nargs='+', metavar='METHOD', default=None,
                   help='with --search: search only these methods (e.g. DAFT "conversion only") '
                   'and keep the recorded choices (and search runs) of the others')
    p.add_argument('--protocol', choices=('grid', 'paper'), default='grid',
                   help='DAFT\'s search with --search: the joint grid (lr x ratio x head scope), '
                   'or the paper\'s two stages (lr at ratio 1 without conversion, then ratio)')
    p.add_argument('--recorded', default=str(RECORDED),
                   help='recorded settings used without --search (default: %(default)s)')
    add_engine_args(p)
    p.add_argument('--verbose', action='store_true', help='mmengine INFO logs of every run')
    args = p.parse_args(argv)
    check_engine_args(p, args)
    if args.search_methods and not args.search:
        p.error('--search-methods needs --search')
    if args.seeds is not None and args.seeds < 1:
        p.error(f'--seeds must be >= 1, got {args.seeds}')
    return Options(quick=args.quick, search=args.search, protocol=args.protocol,
                   seeds=args.seeds, work_dir=args.work_dir, recorded=args.recorded,
                   verbose=args.verbose, search_methods=args.search_methods,
                   **engine_options(args))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    opts = parse_args(argv)
    warnings.filterwarnings('ignore')  # mmengine/mmseg deprecation chatter; errors still raise
    try:
        return run_benchmark(opts)
    except KeyboardInterrupt:  # the trials stopped with Ray; finished ones are cached
        print(f'\ndemo.py: interrupted. Finished trials are kept in {opts.work_dir}: the same '
              'command continues from them.', file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == '__main__':
    main()
