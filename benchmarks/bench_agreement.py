"""What does the ranks' agreement after every batch of DAFT's statistics pass cost?

``daft_mm.core.convert_bn`` makes the ranks agree after every batch (one all-reduce of three
numbers), so that a failing rank stops its peers at their next batch instead of after their whole
pass. This measures that all-reduce on real processes over gloo (the CPU backend), as the
conversion calls it; how soon a Ctrl-C on one rank stops the other's pass (slow batches of 0.5 s);
and, for scale, one eval forward of a batch of the tiny DeepLabV3
(configs/_tiny_, 4 images of 64x128, one thread): the smallest batch a DAFT pass runs.

    python benchmarks/bench_agreement.py --out benchmarks/results/agreement.json
    python benchmarks/bench_agreement.py --quick    # seconds; what the test suite runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _rank(rank: int, world: int, init_file: str, rounds: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from daft_mm.core.conversion import _step_together
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world)
    device = torch.device('cpu')
    for _ in range(min(50, rounds)):  # warm-up: connections, allocator
        _step_together(None, True, 1, world, None, device)
    laps = []
    for i in range(5):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            _step_together(None, True, i, world, None, device)
        laps.append((time.perf_counter() - start) / rounds * 1e6)
    if rank == 0:
        Path(out).write_text(json.dumps(laps))
    os._exit(0)  # right after gloo collectives, as the tests do (torch 2.1 teardown)


def _stopping_rank(rank: int, init_file: str, seconds_per_batch: float, batches: int,
                   out: str) -> None:
    """Both ranks convert a small net over ``batches`` slow batches; rank 1 sends itself SIGINT
    after its second batch. Rank 0 records when it stopped, rank 1 when it was interrupted."""
    import signal

    import torch
    import torch.distributed as dist
    from torch import nn

    from daft_mm.core import ConversionError, convert_bn
    torch.set_num_threads(1)
    # a shell's background job (`cmd &`, nohup) starts with SIGINT ignored, and Python then
    # keeps it ignored: the Ctrl-C below would do nothing. Ctrl-C is what is measured here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    marks = {}

    def slow(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds_per_batch)
        return model(batch)

    def progress(done: int) -> None:
        if rank == 1 and done == 2:
            marks['interrupted'] = time.time()
            os.kill(os.getpid(), signal.SIGINT)

    try:
        convert_bn(net, [torch.randn(2, 3, 8, 8) for _ in range(batches)], forward=slow,
                   progress=progress)
        marks['outcome'] = 'finished'
    except (KeyboardInterrupt, ConversionError) as exc:
        marks['outcome'] = type(exc).__name__
    marks['stopped'] = time.time()
    Path(out, f'rank{rank}.json').write_text(json.dumps(marks))
    os._exit(0)


def stop_latency(tmp: str, seconds_per_batch: float = 0.5, batches: int = 40) -> dict:
    """How long after rank 1's Ctrl-C rank 0 stops its statistics pass."""
    import torch.multiprocessing as mp
    mp.spawn(_stopping_rank, args=(os.path.join(tmp, 'stop_init'), seconds_per_batch, batches,
                                   tmp), nprocs=2, join=True)
    ranks = [json.loads(Path(tmp, f'rank{r}.json').read_text()) for r in range(2)]
    return {'seconds_per_batch': seconds_per_batch, 'batches': batches,
            'whole_pass_s': seconds_per_batch * batches,
            'rank0_stopped_after_s': ranks[0]['stopped'] - ranks[1]['interrupted'],
            'outcomes': [r['outcome'] for r in ranks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--world', type=int, default=2)
    p.add_argument('--rounds', type=int, default=2000)
    p.add_argument('--quick', action='store_true')
    p.add_argument('--out', default=None, help='also write the figures to this JSON file')
    args = p.parse_args()
    rounds = 100 if args.quick else args.rounds
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'laps.json')
        mp.spawn(_rank, args=(args.world, os.path.join(tmp, 'init'), rounds, out),
                 nprocs=args.world, join=True)
        laps = json.loads(Path(out).read_text())
        stop = stop_latency(tmp, batches=6 if args.quick else 40)
    median = statistics.median(laps)
    print(f'agreement after each batch, {args.world} ranks over gloo on this CPU: '
          f'{median:.0f} us per batch (median of 5 x {rounds} rounds; min {min(laps):.0f}, '
          f'max {max(laps):.0f})')
    print(f'a Ctrl-C on rank 1 stops rank 0 {stop["rank0_stopped_after_s"]:.2f} s later (its '
          f'whole pass: {stop["whole_pass_s"]:.0f} s; outcomes {stop["outcomes"]})')
    forward = _tiny_forward_us(3 if args.quick else 20)
    print(f'for scale: one eval forward of the tiny DeepLabV3 on 4 images of 64x128, one thread: '
          f'{forward:.0f} us; the agreement adds {100 * median / forward:.1f}% to that batch')
    result = {'world': args.world, 'rounds': rounds, 'backend': 'gloo',
              'us_per_batch_median': median, 'us_per_batch_laps': laps,
              'tiny_forward_us': forward, 'stop_after_interrupt': stop,
              'date': time.strftime('%Y-%m-%d')}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def _tiny_forward_us(repeats: int) -> float:
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    torch.set_num_threads(1)
    init_default_scope('mmseg')
    cfg = Config.fromfile(str(REPO / 'configs' / '_tiny_' / 'tiny_deeplabv3_cityscapes.py'))
    model = MODELS.build(cfg.model).eval()
    x = torch.randn(4, 3, 64, 128)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            model(x, mode='tensor')
            times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times[2:])


if __name__ == '__main__':
    main()
