"""Per-channel streaming statistics of BatchNorm inputs.

Everything is accumulated in float64 and *about a fixed shift* (the layer's old running mean).
Shifted sums make the accumulators plain sums: batches, and ranks, are merged by addition, so a
distributed pass needs one all-reduce at the end and no per-batch communication. The shift is close
to the data mean, which keeps ``sum((x - shift)**2) - n * mean_shift**2`` free of cancellation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

VAR_MODES = ('batch', 'population')


@dataclass
class ChannelMoments:
    """Final statistics of one layer: what ``convert_bn`` writes into the BN buffers."""

    mean: torch.Tensor  # float64, (C,)
    var: torch.Tensor  # float64, (C,), unbiased, in the requested mode
    num_values: int  # values per channel (samples x spatial positions)
    num_samples: int  # inputs along dim 0, summed over batches
    num_batches: int


#: Kinds of per-batch partial statistics, see ``batch_partials``.
ROWS, MOMENTS = 'rows', 'moments'

#: kind, values per channel, a, b, and for ROWS the per-row centre the rows were reduced about
#: (None: zero, i.e. raw values)
_Partial = Tuple[str, int, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]

#: A (sample, channel) row whose ``mean**2 / var`` exceeds this is reduced a second time about its
#: own mean. Reduced raw in float32, a row's sum of squares carries a relative error of about
#: ``5e-8 * (1 + mean**2 / var)`` in its variance (measured: 5e-4 at |mean|/std = 100, 500% at
#: 1e4); below the threshold that is <= ~3e-6, above it the centred second pass is exact to ~1e-7.
#: Normal activations stay below it, so the second pass costs nothing where it is not needed.
CENTRE_ABOVE = 64.0


#: Elements per chunk of the centred second pass: a buffer that stays in cache and is reused, so
#: the pass costs reads, not fresh (page-faulting) allocations the size of the input.
_CHUNK = 1 << 17


def _centred_rows(rows: torch.Tensor, sums: torch.Tensor, norms: torch.Tensor
                  ) -> Optional[torch.Tensor]:
    """Re-reduces, in place in ``sums``/``norms``, the rows whose mean dwarfs their spread, about
    each row's own float32 mean; returns the (N, C) centres (zero elsewhere), or None when no row
    needs it (the usual case: three small (N, C) ops and one host sync per BN call)."""
    length = rows.shape[-1]
    if length < 2:  # one value per row: its square is exact in float64
        return None
    # mean**2 / var > K  <=>  s**2 * (1 + K) > K * L * q**2   (s: row sum, q: row L2 norm)
    k = CENTRE_ABOVE
    excess = torch.addcmul(sums * sums, norms, norms, value=-k * length / (1.0 + k))
    if excess.max().item() <= 0:  # three small kernels in all when no row needs the second pass
        return None
    index = (excess > 0).flatten().nonzero().squeeze(1)
    flat = rows.reshape(-1, length)  # a view (the input is contiguous)
    centre = sums.flatten()[index] / length
    new_sums, new_norms = torch.empty_like(centre), torch.empty_like(centre)
    per = max(1, _CHUNK // length)
    picked = flat.new_empty(min(per, index.numel()), length)
    for start in range(0, index.numel(), per):
        part = index[start:start + per]
        block = picked[:part.numel()]
        torch.index_select(flat, 0, part, out=block)
        block = block.float() if block.dtype != sums.dtype else block
        block.sub_(centre[start:start + per, None])
        new_sums[start:start + per] = block.sum(-1)
        new_norms[start:start + per] = torch.linalg.vector_norm(block, dim=-1)
    sums.view(-1)[index] = new_sums
    norms.view(-1)[index] = new_norms
    centres = torch.zeros_like(sums)
    centres.view(-1)[index] = centre
    return centres


def batch_partials(x: torch.Tensor) -> _Partial:
    """The least work per BN call that keeps one batch's statistics: one or two reduction kernels,
    nothing promoted to float64, no Python-side arithmetic (that waits for ``_fold``).

    - contiguous CPU input: ``(ROWS, n, sums, norms, centres)``, the sum and the L2 norm of each
      (sample, channel) row, shape (N, C), in float32 at least. On the CPU ``torch.var_mean``'s
      Welford kernel is ~8x slower than a plain sum (it does not vectorise); two vectorised row
      reductions cost about half of the BN layer's own eval forward. Rows whose mean is large next
      to their spread (un-normalised pixels, large-offset features) are reduced again about their
      own mean (``_centred_rows``), so float32 inputs keep a relative variance error below ~1e-5
      up to |mean|/std = 1e4 and beyond; float64 inputs stay exact.
    - anything else (a GPU, channels-last): ``(MOMENTS, n, mean, var0, None)`` from
      ``torch.var_mean``, one fused kernel, per channel (C,), biased variance. Its float32 mean
      drifts by ~1e-7 of |mean|, which the population variance (spread of batch means) feels at
      |mean|/std >= 1e3 (3e-5 at 1e4): on the CPU such batches take their mean from a float64 sum.
      On a GPU that check would cost a host sync per BN call, so the fused kernel's mean is kept.
    """
    n = x.numel() // x.shape[1]
    if x.device.type == 'cpu' and x.is_contiguous():
        rows = x.reshape(x.shape[0], x.shape[1], -1)  # a view: x is contiguous
        # reduced in float32 at least, without a float32 copy of a half-precision input;
        # vector_norm's kernel is ~3x faster than vecdot's for the squares
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sums = rows.sum(-1, dtype=dtype)
        norms = torch.linalg.vector_norm(rows, dim=-1, dtype=dtype)
        centres = None if dtype == torch.float64 else _centred_rows(rows, sums, norms)
        return ROWS, n, sums, norms, centres
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    dims = [0] + list(range(2, x.dim()))
    var0, mean = torch.var_mean(x, dim=dims, correction=0)
    if (x.device.type == 'cpu' and x.dtype != torch.float64
            and bool((mean.square() > CENTRE_ABOVE * var0).any())):
        mean = x.sum(dim=dims, dtype=torch.float64) / n
    return MOMENTS, n, mean, var0, None


def shifted_batch_sums(partials: Sequence[_Partial],
                       shift: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per batch, in order, ``sum(x - shift)`` and ``sum((x - shift)**2)`` per channel: two
    (B, C) float64 tensors, from a few vectorised ops for all the batches together."""
    num, c = len(partials), shift.numel()
    sums = torch.empty(num, c, dtype=torch.float64, device=shift.device)
    squares = torch.empty_like(sums)
    rows = [i for i, p in enumerate(partials) if p[0] == ROWS]
    moments = [i for i, p in enumerate(partials) if p[0] == MOMENTS]
    if rows:
        per_batch = [partials[i][2].shape[0] for i in rows]
        length = torch.tensor([partials[i][1] / partials[i][2].shape[0] for i in rows],
                              dtype=torch.float64, device=shift.device)
        batch_of_row = torch.repeat_interleave(
            torch.arange(len(rows), device=shift.device),
            torch.tensor(per_batch, device=shift.device))
        row_len = length[batch_of_row][:, None]
        s = torch.cat([partials[i][2] for i in rows]).to(torch.float64)
        q = torch.cat([partials[i][3] for i in rows]).to(torch.float64).square()
        # each row was reduced about its centre m (zero: raw); about the shift c, with d = m - c:
        # sum(x - c) = s + L d, sum((x - c)^2) = q + (2 s + L d) d
        if any(partials[i][4] is not None for i in rows):
            centres = torch.cat([partials[i][2].new_zeros(partials[i][2].shape)
                                 if partials[i][4] is None else partials[i][4]
                                 for i in rows]).to(torch.float64)
            d = centres - shift
        else:
            d = -shift.expand_as(s)
        q = q + (2 * s + row_len * d) * d
        s = s + row_len * d
        index = torch.tensor(rows, device=shift.device)
        zeros = torch.zeros(len(rows), c, dtype=torch.float64, device=shift.device)
        sums[index] = zeros.index_add(0, batch_of_row, s)
        squares[index] = zeros.index_add(0, batch_of_row, q)
    if moments:
        n = torch.tensor([partials[i][1] for i in moments], dtype=torch.float64,
                         device=shift.device)[:, None]
        d = torch.stack([partials[i][2] for i in moments]).to(torch.float64) - shift
        m2 = torch.stack([partials[i][3] for i in moments]).to(torch.float64) * n
        index = torch.tensor(moments, device=shift.device)
        sums[index] = d * n
        squares[index] = m2 + d * d * n
    return sums, squares


class ChannelAccumulator:
    """Accumulates one BN layer's input statistics, batch by batch.

    Two variances are kept because DAFT needs the one train-mode BN will see:
    - ``'batch'``: the count-weighted mean of every batch's unbiased variance, i.e. what
      ``running_var`` converges to while fine-tuning with BN in train mode;
    - ``'population'``: the exact pooled unbiased variance of all values seen.

    A batch with a single value per channel has no unbiased variance: it counts towards the mean and
    the population variance but not the batch variance (train-mode BN refuses such batches too).

    ``per_batch=True`` also keeps each batch's sums, so that the variance of *global* batches can be
    recovered after an all-reduce (SyncBatchNorm normalises over the batch of all ranks together).
    """

    #: Batches held (as ``batch_partials``) before they are folded into the float64 sums: per-batch
    #: work stays at one or two reduction kernels (on a GPU each small op is a launch, on a CPU a few
    #: microseconds of Python), and the pending tensors stay small whatever the length of the pass.
    FOLD_EVERY = 64

    def __init__(self, shift: torch.Tensor, per_batch: bool = False) -> None:
        self.shift = shift.detach().to(torch.float64)
        zeros = torch.zeros_like(self.shift)
        self.count = 0  # values per channel
        self.samples = 0
        self.batches = 0
        self.sum = zeros.clone()  # sum(x - shift)
        self.sumsq = zeros.clone()  # sum((x - shift)^2)
        self.batch_var_sum = zeros.clone()  # sum_b n_b * unbiased_var_b
        self.batch_var_count = 0  # sum_b n_b over batches with n_b > 1
        self.per_batch = per_batch
        self.empty_inputs = 0  # calls with a zero-size input (skipped), for a clear error
        self.batch_counts: List[int] = []
        self.batch_sums: List[torch.Tensor] = []
        self.batch_sumsqs: List[torch.Tensor] = []
        self._pending: List[_Partial] = []

    def update(self, x: torch.Tensor) -> None:
        """Adds one BN input ``x`` of shape (N, C, *)."""
        if x.dim() < 2 or x.numel() == 0:
            self.empty_inputs += 1
            return
        self._pending.append(batch_partials(x))
        self.samples += x.shape[0]
        self.batches += 1
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        counts = [p[1] for p in self._pending]
        s, q = shifted_batch_sums(self._pending, self.shift)
        self._pending.clear()
        n = torch.tensor(counts, dtype=torch.float64, device=self.shift.device)[:, None]
        self.sum += s.sum(0)
        self.sumsq += q.sum(0)
        # which batches have a variance is known from the host-side counts: no device sync
        several = [i for i, count in enumerate(counts) if count > 1]
        if several:
            # each batch's sum of squares about its own mean; s and q are about the shift, which
            # lies near the data, so nothing large cancels
            bs, bq, bn = s, q, n
            if len(several) < len(counts):
                pick = torch.tensor(several, device=n.device)
                bs, bq, bn = s[pick], q[pick], n[pick]
            m2 = bq - bs * bs / bn
            self.batch_var_sum += (m2.clamp_min(0.0) / (bn - 1) * bn).sum(0)
            self.batch_var_count += sum(counts[i] for i in several)
        self.count += sum(counts)
        if self.per_batch:
            self.batch_counts.extend(counts)
            self.batch_sums.extend(s.unbind(0))
            self.batch_sumsqs.extend(q.unbind(0))

    # ----------------------------------------------------------------------------- reduction
    def state_vector(self) -> torch.Tensor:
        """Everything that merges by addition, flattened for a single all-reduce."""
        self._fold()
        scalars = torch.tensor([self.count, self.samples, self.batches, self.batch_var_count],
                               dtype=torch.float64, device=self.shift.device)
        return torch.cat([scalars, self.sum, self.sumsq, self.batch_var_sum])

    def load_state_vector(self, vec: torch.Tensor) -> None:
        c = self.shift.numel()
        self.count, self.samples, self.batches, self.batch_var_count = (
            int(round(v)) for v in vec[:4].tolist())
        self.sum, self.sumsq, self.batch_var_sum = (
            vec[4 + i * c:4 + (i + 1) * c].clone() for i in range(3))

    def per_batch_matrix(self, num_batches: int) -> torch.Tensor:
        """(num_batches, 1 + 2C) rows of (n, sum, sumsq), zero-padded past this rank's batches."""
        self._fold()
        c = self.shift.numel()
        out = torch.zeros(num_batches, 1 + 2 * c, dtype=torch.float64, device=self.shift.device)
        for i, (n, s, q) in enumerate(zip(self.batch_counts, self.batch_sums, self.batch_sumsqs)):
            out[i, 0] = n
            out[i, 1:1 + c] = s
            out[i, 1 + c:] = q
        return out

    def use_global_batches(self, rows: torch.Tensor) -> None:
        """Recomputes the batch variance from all-reduced per-batch rows (SyncBatchNorm)."""
        c = self.shift.numel()
        n = rows[:, 0:1]
        valid = n[:, 0] > 1
        n, s, q = n[valid], rows[valid, 1:1 + c], rows[valid, 1 + c:]
        m2 = q - s * s / n
        self.batch_var_sum = (m2 * (n / (n - 1))).sum(0)
        self.batch_var_count = int(n.sum().item())

    # ----------------------------------------------------------------------------- results
    def result(self, var_mode: str) -> ChannelMoments:
        self._fold()
        if self.count == 0:
            raise ValueError('no values were accumulated')
        n = float(self.count)
        d = self.sum / n
        mean = self.shift + d
        if var_mode == 'population':
            if self.count < 2:
                raise ValueError('a single value per channel has no unbiased variance')
            var = (self.sumsq - self.sum * d) / (n - 1)
        elif var_mode == 'batch':
            if self.batch_var_count == 0:
                raise ValueError(
                    "every batch had a single value per channel, so no batch variance exists; "
                    "use larger batches or var_mode='population'")
            var = self.batch_var_sum / self.batch_var_count
        else:
            raise ValueError(f'var_mode must be one of {VAR_MODES}, got {var_mode!r}')
        # Rounding can leave a constant channel at -1e-17: clamp to the exact answer, 0.
        return ChannelMoments(mean=mean, var=var.clamp_min(0.0), num_values=self.count,
                              num_samples=self.samples, num_batches=self.batches)


def all_reduce_accumulators(accumulators: Sequence[ChannelAccumulator],
                            group: Optional[dist.ProcessGroup] = None) -> None:
    """Sums the accumulators of all ranks into every rank: one flattened all-reduce.

    Layers whose accumulators keep per-batch sums (SyncBatchNorm) need a second, also single,
    all-reduce of those rows, after agreeing on the longest pass among the ranks.
    """
    if not accumulators:
        return
    vectors = [acc.state_vector() for acc in accumulators]
    flat = torch.cat(vectors)
    dist.all_reduce(flat, group=group)
    for acc, part in zip(accumulators, flat.split([v.numel() for v in vectors])):
        acc.load_state_vector(part)

    per_batch = [acc for acc in accumulators if acc.per_batch]
    if not per_batch:
        return
    device = per_batch[0].shift.device
    longest = torch.tensor([max(len(acc.batch_counts) for acc in per_batch)],
                           dtype=torch.float64, device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    num_batches = int(longest.item())
    rows = torch.cat([acc.per_batch_matrix(num_batches) for acc in per_batch], dim=1)
    dist.all_reduce(rows, group=group)
    offset = 0
    for acc in per_batch:
        width = 1 + 2 * acc.shift.numel()
        acc.use_global_batches(rows[:, offset:offset + width])
        offset += width
