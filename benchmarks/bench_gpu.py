"""BN conversion and DAFT training on a GPU: is it right, and what does it cost?

Needs torch only (``daft_mm.core`` and a DeepLabV3-like ResNet-50-D8 built here from
``daft_mm.classification.models``), so it runs on a bare CUDA machine without mmcv. One command,
a few minutes on one GPU:

    python benchmarks/bench_gpu.py --out gpu.json                     # CUDA, realistic size
    python benchmarks/bench_gpu.py --quick --device cpu --out x.json  # seconds; the test suite

1. Correctness, every precision regime DAFT meets on a GPU. For each case the statistics that
   ``convert_bn`` writes are compared with a float64 reference computed independently from the
   *same* BN inputs (captured by forward pre-hooks in a separate pass, reduced with
   ``torch.var_mean`` in float64), and the eval-mode output before and after conversion must agree:
   float32, channels_last, bfloat16 autocast, a float16 model, and SyncBatchNorm under a one-rank
   process group (NCCL on a GPU, gloo on the CPU), which runs the SyncBN global-batch path.
2. Time and peak memory of ``convert_bn`` next to a plain eval forward over the same batches
   (rounds in rotated order; ratios are medians of per-round ratios; CUDA peak memory from
   ``max_memory_allocated``).
3. One training step of DAFT (converted BN, zero predictor at 10x LR: two param groups) against
   one of FT (one group) on the same network: what DAFT adds per step.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from daft_mm.classification.models import build_resnet  # noqa: E402
from daft_mm.core import convert_bn, split_param_groups, zero_init_predictors  # noqa: E402

#: tolerances of the correctness checks, per case: (relative error of the mean in units of the
#: reference std, relative error of the variance, relative change of the eval output)
TOLERANCES = {
    'float32': (1e-5, 1e-5, 1e-4),
    'channels_last': (1e-5, 1e-5, 1e-4),
    'bf16_autocast': (1e-4, 1e-4, 2e-2),
    'float16': (1e-4, 1e-4, 2e-2),
    'syncbn': (1e-5, 1e-5, 1e-4),
}


# ----------------------------------------------------------------------------------- the model
class DeepLabV3Like(nn.Module):
    """ResNet-D8 (strides of the last two stages turned into dilations 2 and 4) + an ASPP head
    with BN + a 1x1 classifier ``cls``: the shape of mmseg's DeepLabV3 R-50-D8, in plain torch."""

    def __init__(self, arch: str = 'resnet50', num_classes: int = 19, channels: int = 512,
                 base_width: int = 64) -> None:
        super().__init__()
        self.backbone = build_resnet(arch, num_classes=1, base_width=base_width)
        del self.backbone.fc, self.backbone.avgpool
        for stage, dilation in (('layer3', 2), ('layer4', 4)):
            for module in getattr(self.backbone, stage).modules():
                if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                    module.stride = (1, 1)
                if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                    module.dilation, module.padding = (dilation, dilation), (dilation, dilation)
        width = self.backbone.num_features

        def branch(kernel: int, dilation: int) -> nn.Sequential:
            pad = 0 if kernel == 1 else dilation
            return nn.Sequential(nn.Conv2d(width, channels, kernel, padding=pad,
                                           dilation=dilation, bias=False),
                                 nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

        self.aspp = nn.ModuleList([branch(1, 1)] + [branch(3, d) for d in (12, 24, 36)])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), branch(1, 1))
        self.bottleneck = nn.Sequential(
            nn.Conv2d(channels * 5, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        b = self.backbone
        f = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        f = b.layer4(b.layer3(b.layer2(b.layer1(f))))
        pooled = self.image_pool(f).expand(-1, -1, *f.shape[-2:])
        f = self.bottleneck(torch.cat([m(f) for m in self.aspp] + [pooled], dim=1))
        return F.interpolate(self.cls(f), size=size, mode='bilinear', align_corners=False)


def build_model(args: argparse.Namespace) -> nn.Module:
    """A "pretrained" network: random weights, and BN running statistics that differ from the
    target data (so conversion has something to move)."""
    torch.manual_seed(0)
    if args.quick:
        model = DeepLabV3Like('resnet10', channels=32, base_width=16)
    else:
        model = DeepLabV3Like('resnet50')
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def make_batches(num: int, batch_size: int, size: Sequence[int], device: torch.device,
                 seed: int = 1) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # an offset and a scale the pretrained statistics did not see: the target domain
    return [(torch.randn(batch_size, 3, *size, generator=g) * 1.3 + 0.4).to(device)
            for _ in range(num)]


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------- correctness
def float64_reference(model: nn.Module, batches: Sequence[torch.Tensor],
                      context: Callable[[], Any]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per BN layer, the target mean and batch variance (count-weighted mean of per-batch
    unbiased variances, ``convert_bn``'s default) of its eval-mode inputs, reduced in float64.

    Independent of ``daft_mm.core.stats``: a separate pass, its own hooks, ``torch.var_mean`` on
    a float64 copy of each input.
    """
    sums: Dict[str, Dict[str, Any]] = {}
    handles = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=1)
            n = x.numel() // x.shape[1]
            acc = sums.setdefault(name, {'n': 0, 'mean': 0, 'var': 0})
            acc['n'] += n
            acc['mean'] = acc['mean'] + mean * n
            acc['var'] = acc['var'] + var * n
        return record

    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad(), context():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {name: {'mean': acc['mean'] / acc['n'], 'var': acc['var'] / acc['n']}
            for name, acc in sums.items()}


@contextmanager
def one_rank_group(device: torch.device) -> Iterator[None]:
    """A one-process group (NCCL on CUDA, gloo on the CPU) for the SyncBatchNorm path."""
    if dist.is_initialized():
        yield
        return
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                            init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1,
                            **({'device_id': torch.device('cuda', torch.cuda.current_device())}
                               if device.type == 'cuda' else {}))
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def no_tf32() -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_case(case: str, base: nn.Module, batches: Sequence[torch.Tensor],
               device: torch.device) -> Dict[str, Any]:
    """Convert a copy of ``base`` in one precision regime; compare with the float64 reference."""
    model = copy.deepcopy(base).to(device)
    xs = list(batches)
    context: Callable[[], Any] = nullcontext
    group: Callable[[], Any] = nullcontext
    if case == 'channels_last':
        model = model.to(memory_format=torch.channels_last)
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    elif case == 'bf16_autocast':
        def context() -> Any:
            return torch.autocast(device.type, dtype=torch.bfloat16)
    elif case == 'float16':
        model = model.half()
        xs = [x.half() for x in xs]
    elif case == 'syncbn':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

        def group() -> Any:
            return one_rank_group(device)
    elif case != 'float32':
        raise ValueError(f'unknown case {case!r}')
    model.eval()
    # TF32 convolutions (cuDNN's default) differ from run to run by ~1e-3 when cuDNN picks another
    # algorithm, which would hide the ~1e-7 effect of the conversion on the output
    with group(), no_tf32():
        reference = float64_reference(model, xs, context)
        with torch.no_grad(), context():
            before = [model(x).float() for x in xs[:1]]
        with context():
            report = convert_bn(model, xs, var_mode='batch')
        with torch.no_grad(), context():
            after = [model(x).float() for x in xs[:1]]
    tol = TOLERANCES[case]
    mean_err = var_err = 0.0
    within = True
    bns = dict(model.named_modules())
    for name, ref in reference.items():
        bn = bns[name]
        # a buffer of a half-precision model holds the statistics rounded to its dtype: allow
        # that rounding (one unit in the last place) on top of the tolerance
        ulp = torch.finfo(bn.running_mean.dtype).eps
        std = ref['var'].sqrt().clamp_min(1e-12)
        d_mean = (bn.running_mean.double() - ref['mean']).abs()
        d_var = (bn.running_var.double() - ref['var']).abs()
        mean_err = max(mean_err, float((d_mean / std).max()))
        var_err = max(var_err, float((d_var / ref['var'].clamp_min(1e-12)).max()))
        within &= bool((d_mean <= tol[0] * std + ulp * ref['mean'].abs()).all()
                       and (d_var <= (tol[1] + ulp) * ref['var']).all())
    out_err = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(after, before))
    ok = within and out_err <= tol[2]
    return {'case': case, 'layers': len(report.layers), 'mean_err_in_std': mean_err,
            'var_rel_err': var_err, 'output_rel_change': out_err, 'tolerance': list(tol),
            'ok': ok}


def run_checks(args: argparse.Namespace, device: torch.device) -> List[Dict[str, Any]]:
    base = build_model(argparse.Namespace(quick=True))
    batches = make_batches(3, 2, (64, 96), device, seed=2)
    cases = list(TOLERANCES)
    if device.type == 'cpu':
        cases.remove('float16')  # half-precision convolutions are a GPU regime
    results = [check_case(case, base, batches, device) for case in cases]
    for r in results:
        print(f"  {r['case']:<14} {'ok' if r['ok'] else 'FAIL':<4} mean err {r['mean_err_in_std']:.1e} "
              f"std, var err {r['var_rel_err']:.1e}, output change {r['output_rel_change']:.1e} "
              f"({r['layers']} layers)", flush=True)
    return results


# -------------------------------------------------------------------------------------- timing
def measure(fn: Callable[[], Any], device: torch.device) -> Dict[str, float]:
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda' else 0.0
    return {'seconds': seconds, 'peak_mib': peak}


def rotated_rounds(methods: Dict[str, Callable[[], Any]], rounds: int,
                   device: torch.device) -> Dict[str, List[Dict[str, float]]]:
    names = list(methods)
    out: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            out[n].append(measure(methods[n], device))
    return out


def ratio(samples: Dict[str, List[Dict[str, float]]], a: str, b: str, key: str) -> float:
    return statistics.median(x[key] / y[key] for x, y in zip(samples[a], samples[b]))


def time_conversion(args: argparse.Namespace, device: torch.device,
                    num_batches: int) -> Dict[str, Any]:
    model = build_model(args).to(device)
    pristine = copy.deepcopy(model.state_dict())
    batches = make_batches(num_batches, args.batch_size, args.size, device)

    def forward() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    def convert() -> None:
        model.load_state_dict(pristine)  # every round converts the same pretrained model
        convert_bn(model, batches)

    forward()  # warm-up: cuDNN autotuning, allocator
    convert()
    samples = rotated_rounds({'forward': forward, 'convert_bn': convert}, args.rounds, device)
    result: Dict[str, Any] = {'num_batches': num_batches}
    result.update({m: {'median_s': statistics.median(s['seconds'] for s in v),
                       'min_s': min(s['seconds'] for s in v),
                       'peak_mib': max(s['peak_mib'] for s in v)} for m, v in samples.items()})
    result['time_ratio'] = ratio(samples, 'convert_bn', 'forward', 'seconds')
    if device.type == 'cuda':
        result['memory_ratio'] = (result['convert_bn']['peak_mib']
                                  / result['forward']['peak_mib'])
    return result


def time_train_step(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """FT vs DAFT: the same network, loss and SGD; DAFT converted first (not timed), its
    predictor zeroed and trained at 10x LR in a second param group."""
    size, batch = args.size, args.train_batch_size
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(batch, 3, *size, generator=g) * 1.3 + 0.4).to(device)
    y = torch.randint(0, 19, (batch, *size), generator=g).to(device)

    ft = build_model(args).to(device).train()
    daft = build_model(args).to(device)
    convert_bn(daft, make_batches(2, batch, size, device))
    zero_init_predictors(daft, ['cls'])
    daft.train()
    optims = {
        'ft': torch.optim.SGD(ft.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4),
        'daft': torch.optim.SGD(split_param_groups(daft, ['cls'], lr=0.01, head_lr=0.1),
                                lr=0.01, momentum=0.9, weight_decay=5e-4),
    }
    models = {'ft': ft, 'daft': daft}

    def steps(name: str) -> Callable[[], None]:
        model, optim = models[name], optims[name]

        def run() -> None:
            for _ in range(args.steps):
                optim.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optim.step()
        return run

    for name in models:  # warm-up
        steps(name)()
    samples = rotated_rounds({n: steps(n) for n in models}, args.rounds, device)
    result = {m: {'median_step_ms': 1e3 * statistics.median(s['seconds'] for s in v) / args.steps,
                  'peak_mib': max(s['peak_mib'] for s in v)} for m, v in samples.items()}
    result['step_ratio'] = ratio(samples, 'daft', 'ft', 'seconds')
    per_round = [a['seconds'] / b['seconds'] for a, b in zip(samples['daft'], samples['ft'])]
    result['step_ratio_range'] = [min(per_round), max(per_round)]
    return result


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda', help='cuda (default) or cpu')
    p.add_argument('--quick', action='store_true', help='tiny sizes: seconds, for the tests')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--train-batch-size', type=int, default=8)
    p.add_argument('--size', type=int, nargs=2, default=(512, 1024), metavar=('H', 'W'))
    p.add_argument('--num-batches', type=int, nargs='+', default=[4, 32],
                   help='batches per conversion pass; one timing per value (a short pass shows '
                   'the fixed cost of the end of the pass, a longer one the per-batch cost)')
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--steps', type=int, default=10, help='training steps per round and method')
    p.add_argument('--skip', nargs='*', default=[], choices=['checks', 'conversion', 'train'])
    p.add_argument('--out', help='write the figures as JSON here')
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size = args.train_batch_size = 2
        args.size, args.num_batches, args.rounds, args.steps = (64, 96), [2], 2, 2
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('bench_gpu: no CUDA device here; run it on a GPU machine, or pass --device cpu '
              '(with --quick) to exercise it on the CPU', file=sys.stderr)
        return 2
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    env = {'torch': torch.__version__, 'device': (torch.cuda.get_device_name(device)
                                                  if device.type == 'cuda' else platform.processor()
                                                  or platform.machine()),
           'cuda': torch.version.cuda, 'quick': args.quick,
           'conversion_input': [args.batch_size, 3, *args.size],
           'train_input': [args.train_batch_size, 3, *args.size]}
    print(f"bench_gpu on {env['device']} (torch {env['torch']}, CUDA {env['cuda']})", flush=True)
    out: Dict[str, Any] = {'env': env}
    if 'checks' not in args.skip:
        print('correctness against a float64 reference of the same BN inputs:', flush=True)
        out['checks'] = run_checks(args, device)
    if 'conversion' not in args.skip:
        out['conversion'] = []
        for num in args.num_batches:
            out['conversion'].append(c := time_conversion(args, device, num))
            print(f"conversion of {num} x {args.batch_size}x3x{args.size[0]}x{args.size[1]}: "
                  f"forward {c['forward']['median_s']:.3f} s, convert_bn "
                  f"{c['convert_bn']['median_s']:.3f} s, ratio {c['time_ratio']:.3f}x time"
                  + (f", peak {c['forward']['peak_mib']:.0f} vs {c['convert_bn']['peak_mib']:.0f}"
                     f" MiB ({c['memory_ratio']:.3f}x)" if 'memory_ratio' in c else ''),
                  flush=True)
    if 'train' not in args.skip:
        while True:
            try:
                out['train_step'] = t = time_train_step(args, device)
                break
            except torch.cuda.OutOfMemoryError:
                if args.train_batch_size == 1:
                    raise
                args.train_batch_size //= 2  # recorded in env: the batch that fitted
                env['train_input'][0] = args.train_batch_size
                torch.cuda.empty_cache()
                print(f'out of GPU memory; training batch halved to {args.train_batch_size}',
                      flush=True)
        print(f"train step {args.train_batch_size}x3x{args.size[0]}x{args.size[1]}: "
              f"FT {t['ft']['median_step_ms']:.1f} ms, DAFT {t['daft']['median_step_ms']:.1f} ms, "
              f"ratio {t['step_ratio']:.3f} (rounds {t['step_ratio_range'][0]:.3f}-"
              f"{t['step_ratio_range'][1]:.3f}), peak {t['ft']['peak_mib']:.0f} / "
              f"{t['daft']['peak_mib']:.0f} MiB", flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(out, f, indent=1)
    failed = [c['case'] for c in out.get('checks', []) if not c['ok']]
    if failed:
        print(f'bench_gpu: correctness checks FAILED: {failed}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
