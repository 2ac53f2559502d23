"""Clipping by search: the range whose quantization error is least, found among candidates.

Clipping a few outliers makes the grid finer for everything else; how much to clip is a trade
that a search settles. One search, ``search_clip_ratio``, serves every user: it tries ratios
``r = k / n`` of the full range (k = 1..n), then ``n`` more between the best one's neighbours.

* ``choose_qparams_mse``: symmetric qparams of a tensor whose error is least per scale (per
  output channel of a weight, per group, per tensor), measured on the exact values; QAT's LSQ
  starts from it.
* ``MSEObserver``: the same search on a histogram accumulated over calibration batches, with
  the MSE of each candidate integrated exactly over the bins (``sq_error_antiderivative``).
* ``EntropyObserver``: the KL-divergence threshold of TensorRT, on a histogram of |x|.

Both observers are ``qcore.calibrate`` observers (``observe``, ``clip_range``, ``qparams``).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from qcore.calibrate import _HistogramObserver
from qcore.quant import (MIN_SCALE, Granularity, PerChannel, PerGroup, PerTensor, QParams, qparams_from_range,
                         qrange)


def search_clip_ratio(error_of: Callable[[torch.Tensor], torch.Tensor], num_candidates: int = 100,
                      shape: tuple = ()) -> torch.Tensor:
    """The ratio ``r`` in ``(0, 1]`` with the least ``error_of(r)``, for every slot of ``shape`` at once.

    ``error_of`` takes ratios ``[C, *shape]`` and returns errors of that shape. Stage 1 tries
    ``r = k / n`` (k = 1..n); stage 2 tries ``n`` ratios evenly spaced up to the best one's right
    neighbour, from its left one (``(k - 1) / n``, exclusive, to ``min(k + 1, n) / n``).

    Example:
        >>> r = search_clip_ratio(lambda r: (r - 0.333) ** 2, num_candidates=10)
        >>> round(r.item(), 4)   # stage 1 picks 0.3, stage 2 steps by 0.02 from 0.2 to 0.4
        0.34
        >>> best = search_clip_ratio(lambda r: (r - torch.tensor([[0.25], [0.9]])) ** 2, 10, (2, 1))
        >>> [round(v, 4) for v in best.flatten().tolist()]   # one search per slot
        [0.24, 0.9]
    """
    n = num_candidates
    steps = (torch.arange(1, n + 1, dtype=torch.float64) / n).reshape(n, *(1,) * len(shape))  # [n, 1...]
    k = error_of(steps.expand(n, *shape).clone()).argmin(0)                                     # [*shape]
    lo, hi = k.double() / n, (k + 2).clamp(max=n).double() / n
    # lo + (hi - lo) * j / n, computed as torch.linspace does (from the nearer end), j = 1..n
    j = torch.arange(1, n + 1, dtype=torch.float64).reshape(steps.shape)
    step = (hi - lo) / n
    fine = torch.where(j < (n + 1) / 2, lo + step * j, hi - step * (n - j))                      # [n, *shape]
    return fine.gather(0, error_of(fine).argmin(0).unsqueeze(0)).squeeze(0)


def choose_qparams_mse(x: torch.Tensor, bits: int = 8, granularity: Granularity = PerChannel(axis=0),
                       num_candidates: int = 100) -> QParams:
    """Symmetric qparams whose quantization MSE is least for each scale: clip at ``r * max|x|``.

    The error of every candidate is measured on the exact values (not a histogram); the
    granularity decides which values share a scale, as in ``choose_qparams``.

    Example:
        >>> w = torch.cat([torch.linspace(-1, 1, 101), torch.tensor([8.0])]).unsqueeze(0)
        >>> qp = choose_qparams_mse(w, bits=3)
        >>> qp.scale.shape, qp.scale.item() * qp.qmax < 8.0    # the outlier is clipped
        (torch.Size([1, 1]), True)
    """
    qmin, qmax = qrange(bits, symmetric=True)
    xd = x.detach().float()
    amax = granularity.reduce(xd.abs())[1]                    # the scale's shape: [out, 1], [out, G], []
    xg = granularity.group(xd)                                # [out, in] or [out, G, group_size]
    slot = granularity.expand(amax)                           # broadcasts against xg
    slot = slot.reshape((1,) * (xg.ndim - slot.ndim) + tuple(slot.shape))  # per tensor: [1, 1]
    per_chunk = max(1, 1_000_000 // max(1, xd.numel()))      # about 1M values per chunk of candidates

    def error_of(r: torch.Tensor) -> torch.Tensor:            # r [C, *slot.shape] -> [C, *slot.shape]
        errs = []
        for rc in r.split(per_chunk):
            s = (rc.float() * slot / qmax).clamp(min=MIN_SCALE)
            errs.append(((torch.round(xg / s).clamp(qmin, qmax) * s - xg) ** 2).sum_to_size(s.shape))
        return torch.cat(errs)

    t = search_clip_ratio(error_of, num_candidates, tuple(slot.shape)).float() * slot
    t = t.reshape(amax.shape)
    return qparams_from_range(-t, t, bits, symmetric=True, granularity=granularity)


def sq_error_antiderivative(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                             hi: torch.Tensor, levels: int) -> torch.Tensor:
    """``E(x) = integral from lo to x of (t - Q(t))**2 dt`` for the clamped uniform grid.

    Q rounds to the nearest of ``lo + k * scale`` (k = 0..levels-1, ``hi`` the last) and
    clamps. Inside the grid, with ``s = (t - lo) / scale``, each unit of s contributes
    ``scale**3 / 12`` and a partial unit ``f`` contributes ``f**3/3`` (f <= 1/2) or
    ``1/12 - (1-f)**3/3``; outside, the clipping error integrates to ``(t - hi)**3 / 3``.
    Shapes broadcast: x ``[1, K]`` against scale, lo, hi ``[C, 1]`` gives ``[C, K]``.
    """
    s = ((x.clamp(lo, hi) - lo) / scale).clamp(0, levels - 1)
    n, f = torch.floor(s), s - torch.floor(s)
    part = torch.where(f <= 0.5, f**3 / 3, 1 / 12 - (1 - f) ** 3 / 3)
    inside = scale**3 * (n / 12 + part)
    below = (lo - x).clamp(min=0) ** 3 / 3
    above = (x - hi).clamp(min=0) ** 3 / 3
    return inside - below + above


class MSEObserver(_HistogramObserver):
    """Clip to the range that minimises the quantization MSE of the histogrammed data.

    Candidates are ratios ``r = k / n`` (k = 1..n) of the observed range, the best then
    refined with ``n`` more ratios between its neighbours. Symmetric: ``[-r a, r a]`` with
    ``a = max|x|``. Asymmetric: ``[r_lo xmin, r_hi xmax]``, starting from the best
    ``[-T, T]`` cut to the data range, then searching the two ratios in turn (two rounds of
    coordinate descent): outliers are often on one side only, and shrinking both ends
    together would clip the clean side. Each candidate's MSE is ``estimate_mse``, exact for
    a density uniform inside each bin and computed on the real grid (``qparams_from_range``,
    zero-point rounding included), so both the rounding error of the kept values and the
    clipping error of the tails count. See the MSE range setting in Nagel et al., "A White
    Paper on Neural Network Quantization", https://arxiv.org/abs/2106.08295.

    Args:
        num_candidates: n, the number of ratios per search stage.
        bins: histogram bins on each side of 0 (a power of two).

    Example:
        >>> x = torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([10.0])])
        >>> obs = MSEObserver(bits=4, symmetric=True); _ = obs(x)
        >>> round(obs.clip_range()[1].item(), 2)        # the lone outlier is clipped
        0.95
    """

    def __init__(self, num_candidates: int = 100, bits: int = 8, symmetric: bool = False,
                 granularity: Granularity = PerTensor(), *, bins: int = 2048):
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be positive, got {num_candidates}")
        super().__init__(bits, symmetric, granularity, bins)
        self.num_candidates = num_candidates

    def estimate_mse(self, xmin, xmax) -> torch.Tensor:
        """Estimated MSE per element of the observed data for candidate ranges.

        ``sum over bins of count / width * (E(right edge) - E(left edge))``, divided by the
        number of values, with ``E`` from ``sq_error_antiderivative``.

        Args:
            xmin, xmax: candidate ranges, floats or tensors ``[C]``.

        Returns:
            float64 tensor ``[C]``.

        Example:
            >>> x = torch.linspace(-1, 1, 1001)
            >>> obs = MSEObserver(bits=4, symmetric=True); _ = obs(x)
            >>> [round(v, 4) for v in obs.estimate_mse([-1.0, -0.5], [1.0, 0.5]).tolist()]
            [0.0017, 0.0421]
            >>> from qcore.quant import fake_quantize, mse
            >>> round(mse(x, fake_quantize(x, qparams_from_range(-0.5, 0.5, 4, True))), 4)
            0.0421
        """
        h = self.hist
        xmin = torch.as_tensor(xmin, dtype=torch.float32).reshape(-1)
        xmax = torch.as_tensor(xmax, dtype=torch.float32).reshape(-1)
        qp = qparams_from_range(xmin, xmax, self.bits, self.symmetric)
        scale = qp.scale.double()[:, None]
        lo = (qp.qmin - qp.zero_point.double()[:, None]) * scale
        hi = (qp.qmax - qp.zero_point.double()[:, None]) * scale
        width = h.R / h.bins
        nz = torch.nonzero(h.counts).squeeze(1)  # empty bins add nothing: skip them
        left = ((nz - h.bins).double() * width)[None, :]
        levels = qp.qmax - qp.qmin + 1
        e = (sq_error_antiderivative(left + width, scale, lo, hi, levels)
             - sq_error_antiderivative(left, scale, lo, hi, levels))
        return (e * h.counts[nz]).sum(1) / width / h.counts.sum()

    def _search(self, candidates) -> float:
        """Best ratio r in (0, 1] for ``candidates(r [C]) -> (xmin [C], xmax [C])``."""
        return search_clip_ratio(lambda r: self.estimate_mse(*candidates(r)), self.num_candidates).item()

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hist
        lo, hi = (-h.amax, h.amax) if self.symmetric else (h.xmin, h.xmax)
        if h.xmin == h.xmax:  # constant data: nothing to clip
            pass
        elif self.symmetric:
            hi = self._search(lambda r: (-r * h.amax, r * h.amax)) * h.amax
            lo = -hi
        else:
            # Start from one threshold T on |x| (a good guess when the outliers are on one
            # side), then let each end move on its own. The grid always contains 0, so the
            # ends are kept on either side of it: [lo0, hi0] is the range qparams sees.
            lo0, hi0 = min(h.xmin, 0.0), max(h.xmax, 0.0)
            t = self._search(lambda r: ((-r * h.amax).clamp(min=lo0),
                                        (r * h.amax).clamp(max=hi0))) * h.amax
            lo, hi = max(lo0, -t), min(hi0, t)
            for _ in range(2):
                if hi0 > 0:
                    hi = self._search(lambda r: (torch.full_like(r, lo), r * hi0)) * hi0
                if lo0 < 0:
                    lo = self._search(lambda r: (r * lo0, torch.full_like(r, hi))) * lo0
        return torch.tensor(lo), torch.tensor(hi)


class EntropyObserver(_HistogramObserver):
    """KL-divergence calibration on a histogram of |x| (TensorRT style).

    For each candidate threshold ``T_i = i * width`` (i from ``nq`` up to the last non-empty
    bin) the reference ``P`` is the first ``i`` bins of |x| with the clipped tail added to
    bin ``i - 1``; ``Q`` merges those ``i`` bins into ``nq`` chunks and spreads each chunk's
    count evenly over its non-empty bins. The chosen T minimises ``KL(P || Q)``: it trades
    the information lost by clipping against that lost by coarse levels. ``nq`` is
    ``2**(bits-1)`` (|x| covers one half of a signed grid), or ``2**bits`` for an
    asymmetric observer whose data were never negative (range ``[0, T]``). Thresholds past
    the largest |x| are not tried (they clip nothing). The KL optimum depends on the bin
    width, so a histogram whose range doubled while accumulating can move T by ~15%
    (Student-t data); the other histogram observers move by well under 1%.
    Migacz, "8-bit Inference with TensorRT", GTC 2017:
    https://on-demand.gputechconf.com/gtc/2017/presentation/s7310-8-bit-inference-with-tensorrt.pdf

    Args:
        bins: bins of the |x| histogram (a power of two; TensorRT uses 2048).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.distributions.StudentT(2.0).sample((20000,))
        >>> obs = EntropyObserver(symmetric=True); _ = obs(x)
        >>> bool(obs.clip_range()[1] < x.abs().max())
        True
    """

    def __init__(self, bins: int = 2048, bits: int = 8, symmetric: bool = False,
                 granularity: Granularity = PerTensor()):
        super().__init__(bits, symmetric, granularity, bins)

    def _threshold(self, nq: int) -> float:
        # A loop over ~2000 candidates on arrays of <= `bins` values: NumPy's per-call
        # overhead is a few times lower than torch's here.
        hist = self.hist.abs_counts().numpy()
        last = int(np.nonzero(hist)[0].max()) + 1  # beyond this, T clips nothing (min-max)
        if last <= nq:
            return self.hist.amax
        best_kl, best_i = math.inf, last
        for i in range(nq, last + 1):
            p = hist[:i].copy()
            p[i - 1] += hist[i:].sum()  # clipped values saturate at the threshold
            m = i // nq  # chunk size; the last chunk also takes the remainder
            chunk = np.minimum(np.arange(i) // m, nq - 1)
            nonzero = p > 0
            total = np.bincount(chunk, weights=hist[:i], minlength=nq)
            count = np.bincount(chunk, weights=nonzero, minlength=nq)
            q = nonzero * total[chunk] / np.maximum(count[chunk], 1)
            if q.sum() == 0:  # all unclipped bins empty: T loses everything, skip it
                continue
            p, q = p[nonzero] / p.sum(), q[nonzero] / q.sum()
            # Q can be 0 where P is not (a clipped tail in an empty last chunk): a tiny floor
            # keeps KL finite but large, instead of smoothing every bin.
            kl = float((p * np.log(p / np.maximum(q, 1e-12))).sum())
            if kl < best_kl:
                best_kl, best_i = kl, i
        return min(best_i * self.hist.R / self.hist.bins, self.hist.amax)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hist
        if h.R == 0.0:
            return torch.tensor(0.0), torch.tensor(0.0)
        if self.symmetric:
            t = self._threshold(2 ** (self.bits - 1))
            return torch.tensor(-t), torch.tensor(t)
        unsigned = h.xmin >= 0
        t = self._threshold(2**self.bits if unsigned else 2 ** (self.bits - 1))
        return torch.tensor(max(h.xmin, -t)), torch.tensor(min(h.xmax, t))
