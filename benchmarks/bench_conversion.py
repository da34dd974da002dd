"""How much does BN conversion cost next to a plain forward pass over the same data?

Compares, over identical batches:
  1. ``forward``:   a plain ``torch.no_grad()`` eval forward (the floor);
  2. ``convert_bn``: daft_mm.core.convert_bn;
  3. ``reference``: the procedure as the DAFT paper describes it, written plainly as the baseline to
     beat: deep-copy the model, replace every BN ``forward`` with one that records ``torch.mean`` and
     ``torch.var`` of its batch, average the per-batch statistics, then rewrite the original BNs.

Time: each round runs every method once, in an order rotated from round to round (no method always
runs first, or last, in a warm or a cooling machine); the table gives the median over rounds, and
the ratios are medians of the per-round ratios, which cancels the slow drift of a shared machine.
The minimum over rounds is reported too. ``--threads`` pins the intra-op threads (one thread is
much quieter than two on a shared 2-core machine).

Memory: CPU peak RSS of a fresh subprocess per method, with glibc's mmap threshold pinned
(``MALLOC_MMAP_THRESHOLD_``): by default glibc raises that threshold as large blocks are freed and
then serves activations from a heap that fragments, so the peak RSS of one and the same forward pass
varied by +-5% from run to run here; pinned, every activation is mapped and unmapped on its own and
the peak is that of the live tensors (repeatable to 1 MiB). On CUDA: ``max_memory_allocated``.

    python benchmarks/bench_conversion.py                 # ResNet-50 DeepLabV3 + classifier, CPU
    python benchmarks/bench_conversion.py --device cuda   # on a GPU, if there is one
    python benchmarks/bench_conversion.py --quick         # seconds; what the test suite runs
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from daft_mm.core import convert_bn

METHODS = ('forward', 'convert_bn', 'reference')
#: bytes; glibc maps every block at least this large on its own (see the module docstring)
MMAP_THRESHOLD = 128 * 1024


# ------------------------------------------------------------------------------------- models
def build_model(name: str, quick: bool) -> nn.Module:
    depth = 18 if quick else 50
    if name == 'deeplabv3':
        from mmseg.models.backbones import ResNetV1c
        from mmseg.models.decode_heads import ASPPHead

        class DeepLabV3(nn.Module):
            """mmseg's DeepLabV3 R-50-D8 backbone and ASPP head, BN instead of SyncBN."""

            def __init__(self) -> None:
                super().__init__()
                norm = dict(type='BN', requires_grad=True)
                self.backbone = ResNetV1c(depth=depth, dilations=(1, 1, 2, 4),
                                          strides=(1, 2, 1, 1), norm_cfg=norm,
                                          contract_dilation=True)
                width = 512 if depth < 50 else 2048
                self.decode_head = ASPPHead(in_channels=width, in_index=3,
                                            channels=128 if quick else 512,
                                            dilations=(1, 12, 24, 36), num_classes=19,
                                            norm_cfg=norm, align_corners=False)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.decode_head(self.backbone(x))

        return DeepLabV3()
    if name == 'resnet50':
        from daft_mm.classification.models import build_resnet
        return build_resnet('resnet18' if quick else 'resnet50', num_classes=1000)
    raise ValueError(f'unknown model {name!r}; choose deeplabv3 or resnet50')


def randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def make_batches(args: argparse.Namespace, num_batches: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(args.batch_size, 3, *args.size, generator=g).to(args.device)
            for _ in range(num_batches)]


# ------------------------------------------------------------------------------------ methods
def plain_forward(model: nn.Module, batches: List[torch.Tensor]) -> None:
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)


def daft_convert(model: nn.Module, batches: List[torch.Tensor]) -> None:
    convert_bn(model, batches)


def reference_convert(model: nn.Module, batches: List[torch.Tensor]) -> None:
    """The straightforward recipe: deep copy, patched BN forwards, per-batch torch.mean/torch.var."""
    probe = copy.deepcopy(model)
    records: Dict[str, List] = {}

    def recording_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        records.setdefault(self._daft_name, []).append(
            (torch.mean(x, dim=dims), torch.var(x, dim=dims)))
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    for name, m in probe.named_modules():
        if isinstance(m, _BatchNorm):
            m._daft_name = name
            m.forward = types.MethodType(recording_forward, m)
    plain_forward(probe, batches)
    targets = dict(model.named_modules())
    with torch.no_grad():
        for name, recs in records.items():
            bn = targets[name]
            mean = torch.stack([r[0] for r in recs]).mean(0)
            var = torch.stack([r[1] for r in recs]).mean(0)
            std_old = (bn.running_var + bn.eps).sqrt()
            bn.bias += (mean - bn.running_mean) * bn.weight / std_old
            bn.weight *= (var + bn.eps).sqrt() / std_old
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)


RUNNERS: Dict[str, Callable[[nn.Module, List[torch.Tensor]], None]] = {
    'forward': plain_forward, 'convert_bn': daft_convert, 'reference': reference_convert}


# ---------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def time_methods(model: nn.Module, runs: Dict[str, Callable[[nn.Module], None]],
                 args: argparse.Namespace) -> Dict[str, List[float]]:
    """Seconds per run and round; rounds rotate the order so noise and drift hit all alike."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    order = list(runs)
    for rep in range(args.repeats + 1):  # the first round warms up
        for name in order:
            work = copy.deepcopy(model)  # conversion edits the model in place
            sync(args.device)
            start = time.perf_counter()
            runs[name](work)
            sync(args.device)
            if rep:
                times[name].append(time.perf_counter() - start)
        order = order[1:] + order[:1]
    return times


def paired_ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` within the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _read_status(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def peak_memory_worker(args: argparse.Namespace) -> None:
    """Run in a fresh process: peak bytes of one method, after a warm-up forward."""
    model = randomize_bn(build_model(args.model, args.quick)).to(args.device)
    batches = make_batches(args, args.num_batches)
    plain_forward(copy.deepcopy(model), batches[:1])  # lazy initialisations out of the way
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        RUNNERS[args.worker](model, batches)
        peak = torch.cuda.max_memory_allocated()
    else:
        RUNNERS[args.worker](model, batches)
        peak = _read_status('VmHWM:')
    print(json.dumps({'peak_bytes': peak}))


def peak_memory(method: str, args: argparse.Namespace) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', method, '--model', args.model,
           '--device', args.device, '--batch-size', str(args.batch_size),
           '--num-batches', str(args.num_batches), '--size', *map(str, args.size)]
    if args.quick:
        cmd.append('--quick')
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])['peak_bytes']


def bench_model(name: str, args: argparse.Namespace) -> Dict:
    args.model = name
    model = randomize_bn(build_model(name, args.quick)).to(args.device)
    batches = make_batches(args, args.num_batches)
    times = time_methods(
        model, {m: functools.partial(RUNNERS[m], batches=batches) for m in METHODS}, args)
    # linearity: the same conversion over N and 2N batches, rounds interleaved
    double = make_batches(args, 2 * args.num_batches)
    lin = time_methods(model, {'convert_bn': functools.partial(daft_convert, batches=batches),
                               'convert_bn_2x': functools.partial(daft_convert, batches=double)},
                       args)
    mem = {m: peak_memory(m, args) for m in METHODS}
    return {
        'model': name,
        'time_s': {m: statistics.median(t) for m, t in times.items()},
        'time_min_s': {m: min(t) for m, t in times.items()},
        'time_rounds_s': times,
        'peak_bytes': mem,
        'time_ratio_convert_vs_forward': paired_ratio(times, 'convert_bn', 'forward'),
        'time_ratio_convert_vs_reference': paired_ratio(times, 'convert_bn', 'reference'),
        'time_ratio_min_convert_vs_forward': min(times['convert_bn']) / min(times['forward']),
        'memory_ratio_convert_vs_forward': mem['convert_bn'] / mem['forward'],
        'memory_ratio_convert_vs_reference': mem['convert_bn'] / mem['reference'],
        'time_ratio_2x_batches': paired_ratio(lin, 'convert_bn_2x', 'convert_bn'),
    }


def print_table(results: List[Dict], args: argparse.Namespace) -> None:
    print(f'\nBN conversion cost on {args.device} ({args.machine}), {args.num_batches} batches of '
          f'{args.batch_size}x3x{args.size[0]}x{args.size[1]}, {args.repeats} rounds')
    print(f'{"model":<10} {"method":<11} {"median s":>9} {"min s":>8} {"peak MiB":>9}')
    for r in results:
        for m in METHODS:
            print(f'{r["model"]:<10} {m:<11} {r["time_s"][m]:>9.3f} {r["time_min_s"][m]:>8.3f} '
                  f'{r["peak_bytes"][m] / 2**20:>9.1f}')
        print(f'{"":<10} convert/forward: time {r["time_ratio_convert_vs_forward"]:.3f}x '
              f'(of the minima {r["time_ratio_min_convert_vs_forward"]:.3f}x), memory '
              f'{r["memory_ratio_convert_vs_forward"]:.3f}x; convert/reference: time '
              f'{r["time_ratio_convert_vs_reference"]:.3f}x, memory '
              f'{r["memory_ratio_convert_vs_reference"]:.3f}x; 2x batches: '
              f'{r["time_ratio_2x_batches"]:.2f}x time')


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--quick', action='store_true', help='ResNet-18 sized models, tiny inputs')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--models', default='deeplabv3,resnet50')
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--num-batches', type=int, default=None)
    p.add_argument('--size', type=int, nargs=2, default=None, metavar=('H', 'W'))
    p.add_argument('--repeats', type=int, default=None, help='timed rounds (after one warm-up)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch intra-op threads (default: torch\'s own choice)')
    p.add_argument('--out', default='benchmarks/results/conversion.json')
    p.add_argument('--worker', choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument('--model', help=argparse.SUPPRESS)
    args = p.parse_args()
    defaults = dict(batch_size=2, num_batches=2, size=[64, 64], repeats=2) if args.quick else \
        dict(batch_size=2, num_batches=4, size=[256, 512], repeats=9)
    if args.device == 'cuda' and not args.quick:
        defaults.update(batch_size=4, num_batches=10, size=[512, 1024])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is visible')
    args.machine = (torch.cuda.get_device_name() if args.device == 'cuda'
                    else f'{platform.processor() or platform.machine()}, '
                         f'{torch.get_num_threads()} threads')
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        peak_memory_worker(args)
        return
    results = [bench_model(name, args) for name in args.models.split(',')]
    print_table(results, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump({'device': args.device, 'machine': args.machine, 'torch': torch.__version__,
                   'batch_size': args.batch_size, 'num_batches': args.num_batches,
                   'size': args.size, 'repeats': args.repeats, 'quick': args.quick,
                   'mmap_threshold': MMAP_THRESHOLD if args.device == 'cpu' else None,
                   'results': results}, f, indent=2)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
