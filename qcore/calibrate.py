"""Calibration observers: choose a clipping range ``[xmin, xmax]`` from the data seen so far.

An observer watches calibration batches go by and, when asked, turns what it saw into
``QParams``. Every observer only *chooses a range*; ``qparams()`` then calls
``qcore.quant.qparams_from_range`` so scale and zero-point come from one formula.

Design: each observer is an ``nn.Module`` whose ``observe(x)`` (also its ``forward``)
updates the statistics and returns ``x`` unchanged, so it can sit inside a model
(``nn.Sequential(layer, obs)``) or be called from a forward hook. ``reset()`` forgets all
data; ``qparams()`` before any data raises ``RuntimeError``.

* ``MinMaxObserver``: running min/max (exact, any granularity).
* ``MovingAverageMinMaxObserver``: exponential moving average of the per-batch min/max.
* ``PercentileObserver``: clip outliers at a percentile of a histogram accumulated over
  batches (per-tensor only), see ``_Histogram``. The observers that *search* for the best clip
  (MSE, entropy) are in ``qcore.clipping``.

Background: Wu et al., "Integer Quantization for Deep Learning Inference" (2020),
https://arxiv.org/abs/2004.09602 compares max, percentile, MSE and entropy calibration.

Example (an observer in a forward hook):
    >>> _ = torch.manual_seed(0)
    >>> layer, obs = torch.nn.Linear(4, 4), MinMaxObserver()
    >>> handle = layer.register_forward_hook(lambda mod, inp, out: obs(out))
    >>> for _ in range(3):
    ...     _ = layer(torch.randn(8, 4))
    >>> handle.remove()
    >>> qp = obs.qparams(); qp.scale.item() > 0, 0 <= qp.zero_point.item() <= 255
    (True, True)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from qcore.quant import Granularity, PerChannel, PerGroup, PerTensor, QParams, qparams_from_range, qrange


class Observer(nn.Module):
    """Base class: accumulate statistics over batches, then pick a range for ``QParams``.

    Subclasses implement ``_update(x)`` (``x`` detached, float32, finite, non-empty),
    ``_range() -> (xmin, xmax)`` and ``_reset()``.

    Example:
        >>> obs = MinMaxObserver(bits=4, symmetric=True)
        >>> y = obs(torch.tensor([-1.0, 0.5]))          # returns its input unchanged
        >>> y.tolist(), round(obs.qparams().scale.item(), 4), obs.qparams().qmax
        ([-1.0, 0.5], 0.1429, 7)
    """

    supported_granularities: tuple[type, ...] = (PerTensor,)

    def __init__(self, bits: int = 8, symmetric: bool = False,
                 granularity: Granularity = PerTensor()):
        super().__init__()
        qrange(bits, symmetric)  # validates bits early rather than at qparams()
        if not isinstance(granularity, self.supported_granularities):
            names = ", ".join(g.__name__ for g in self.supported_granularities)
            raise ValueError(f"{type(self).__name__} supports {names} only, "
                             f"got {granularity!r}")
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity
        self.num_observed = 0

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Add ``x`` to the statistics and return ``x`` itself, untouched.

        Args:
            x: any shape (PerChannel/PerGroup: the shape their ``reduce`` expects). An
                empty tensor is skipped; NaN or infinity raises ``ValueError``.

        Example:
            >>> obs = MinMaxObserver(); x = torch.tensor([1.0, -3.0])
            >>> obs.observe(x) is x, obs.num_observed
            (True, 2)
        """
        xd = x.detach().float()
        if xd.numel() == 0:
            return x
        if not bool(torch.isfinite(xd).all()):
            raise ValueError(f"{type(self).__name__} observed NaN or infinite values")
        self._update(xd)
        self.num_observed += xd.numel()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``observe(x)``, so that ``obs(x)`` works in ``nn.Sequential`` and forward hooks."""
        return self.observe(x)

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen range ``(xmin, xmax)``, before ``qparams_from_range`` widens it to 0.

        0-d tensors, or ``granularity.reduce``'s shape (e.g. ``[out, 1]``). Clipping
        observers in symmetric mode return ``(-T, T)``. Raises ``RuntimeError`` before data.

        Example:
            >>> obs = PercentileObserver(percentile=100.0); _ = obs(torch.tensor([-1.0, 2.0]))
            >>> [v.item() for v in obs.clip_range()]
            [-1.0, 2.0]
        """
        if self.num_observed == 0:
            raise RuntimeError(f"{type(self).__name__} has observed no data: call observe(x) "
                               "on calibration batches before qparams()")
        return self._range()

    def qparams(self) -> QParams:
        """Scale and zero-point of the chosen range, by the one formula of ``qcore.quant``.

        ``qparams_from_range(*clip_range(), bits, symmetric, granularity)``.

        Example:
            >>> obs = MinMaxObserver(); _ = obs(torch.tensor([-20.0, 1000.0]))
            >>> obs.qparams().scale.item(), obs.qparams().zero_point.item()
            (4.0, 5)
        """
        xmin, xmax = self.clip_range()
        return qparams_from_range(xmin, xmax, self.bits, self.symmetric, self.granularity)

    def reset(self) -> None:
        """Forget every batch observed so far (e.g. before calibrating on new data).

        Example:
            >>> obs = MinMaxObserver(); _ = obs(torch.ones(3)); obs.reset()
            >>> obs.qparams()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            RuntimeError: MinMaxObserver has observed no data: call observe(x) ...
        """
        self.num_observed = 0
        self._reset()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}"


# ----------------------------------------------------------------------------- min / max
class MinMaxObserver(Observer):
    """Running minimum and maximum: ``xmin = min over batches of min(x)`` (likewise xmax).

    Exact and order-independent, so observing in batches equals observing at once. With
    PerChannel/PerGroup the statistics have the shape of ``granularity.reduce(x)``
    (e.g. ``[out, 1]`` for ``[out, in]`` and ``PerChannel(0)``), which must not change.

    Example:
        >>> obs = MinMaxObserver()
        >>> for batch in ([0.0, 4.0], [-1.0, 2.0]):
        ...     _ = obs.observe(torch.tensor(batch))
        >>> [v.item() for v in obs.clip_range()], round(obs.qparams().scale.item(), 5)
        ([-1.0, 4.0], 0.01961)
    """

    # Running statistics are elementwise, so every granularity works (shapes permitting).
    supported_granularities = (PerTensor, PerChannel, PerGroup)

    def __init__(self, bits: int = 8, symmetric: bool = False,
                 granularity: Granularity = PerTensor()):
        super().__init__(bits, symmetric, granularity)
        self._reset()

    def _reset(self) -> None:
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.granularity.reduce(x)
        if self.min_val is not None and lo.shape != self.min_val.shape:
            raise ValueError(f"{self.granularity} statistics of shape {tuple(lo.shape)} do not "
                             f"match the earlier {tuple(self.min_val.shape)}")
        return lo, hi

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of the batch min/max, as in quantization-aware training.

    ``xmin <- xmin + c * (min(x) - xmin)`` with ``c = averaging_constant`` (likewise
    xmax); the first batch initialises. Rare outlier batches move the range by only ``c``
    of their excess (Jacob et al. 2018, https://arxiv.org/abs/1712.05877). Same formula as
    ``torch.ao.quantization.MovingAverageMinMaxObserver``.

    Example:
        >>> obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
        >>> for batch in ([0.0, 4.0], [0.0, 2.0]):
        ...     _ = obs(torch.tensor(batch))
        >>> obs.clip_range()[1].item()
        3.0
    """

    def __init__(self, averaging_constant: float = 0.01, bits: int = 8,
                 symmetric: bool = False, granularity: Granularity = PerTensor()):
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        super().__init__(bits, symmetric, granularity)
        self.averaging_constant = averaging_constant

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)


# ----------------------------------------------------------------------------- histogram
class _Histogram:
    """Counts of x in ``2 * bins`` equal bins over ``[-R, R]``, with a bin edge at 0.

    ``R`` starts at the first batch's max|x| and, when a later batch goes further, doubles
    as often as needed (``R <- R * 2**k``); each new bin is then the exact union of ``2**k``
    old ones, so growing loses no counts and needs no interpolation (``bins`` must be a power
    of two). The price: the bin width ``R / bins`` is at most ``2 * max|x| / bins`` instead
    of ``max|x| / bins``. The folded ``|x|`` histogram is ``neg.flip() + pos`` on the same
    edges. The exact min and max are tracked too, so that no estimate leaves the data range.
    """

    def __init__(self, bins: int):
        if bins < 1 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, got {bins}")
        self.bins, self.R = bins, 0.0
        self.counts = torch.zeros(2 * bins, dtype=torch.float64)
        self.xmin, self.xmax = math.inf, -math.inf

    def add(self, x: torch.Tensor) -> None:
        lo, hi = (v.item() for v in torch.aminmax(x))
        self.xmin, self.xmax = min(self.xmin, lo), max(self.xmax, hi)
        amax = max(-lo, hi)
        if amax > self.R:
            self._grow(amax)
        if self.R == 0.0:  # only zeros so far: they sit in the first bin right of 0
            idx = torch.full((x.numel(),), self.bins, dtype=torch.long, device=x.device)
        else:  # floor(x / width) + bins, so a tiny negative x lands left of the 0 edge
            idx = torch.floor(x.reshape(-1).double() * (self.bins / self.R)).long() + self.bins
            idx = idx.clamp_(0, 2 * self.bins - 1)  # x == R belongs to the last bin
        self.counts += torch.bincount(idx, minlength=2 * self.bins).to(self.counts)

    def _grow(self, amax: float) -> None:
        if self.R == 0.0:  # zeros stay in the bin right of 0 whatever R is
            self.R = amax
            return
        f = 1
        while self.R * f < amax:
            f *= 2
        g = min(f, self.bins)  # f > bins: each half collapses into the bin next to 0
        m = self.bins // g
        neg = self.counts[: self.bins].view(m, g).sum(1)
        pos = self.counts[self.bins:].view(m, g).sum(1)
        pad = torch.zeros(self.bins - m, dtype=torch.float64)
        self.counts = torch.cat([pad, neg, pos, pad])
        self.R *= f

    @property
    def amax(self) -> float:
        return max(-self.xmin, self.xmax)

    def abs_counts(self) -> torch.Tensor:
        """Histogram of |x|: ``bins`` bins of width ``R / bins`` over ``[0, R]``."""
        return self.counts[self.bins:] + self.counts[: self.bins].flip(0)

    def quantile(self, q: float, absolute: bool = False) -> float:
        """q-quantile (q in [0, 1]) of x (or |x|), linear within a bin: error < one bin width."""
        counts, start = (self.abs_counts(), 0.0) if absolute else (self.counts, -self.R)
        width = self.R / self.bins
        cdf = counts.cumsum(0)
        target = q * cdf[-1].item()
        i = min(int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype))), len(cdf) - 1)
        before = cdf[i - 1].item() if i > 0 else 0.0
        frac = min(max((target - before) / max(counts[i].item(), 1e-300), 0.0), 1.0)
        value = start + (i + frac) * width
        lo, hi = (0.0, self.amax) if absolute else (self.xmin, self.xmax)
        return min(max(value, lo), hi)


class _HistogramObserver(Observer):
    """Shared part of the histogram observers (per-tensor only)."""

    def __init__(self, bits: int, symmetric: bool, granularity: Granularity, bins: int):
        super().__init__(bits, symmetric, granularity)
        self.bins = bins
        self._reset()

    def _reset(self) -> None:
        self.hist = _Histogram(self.bins)

    def _update(self, x: torch.Tensor) -> None:
        self.hist.add(x)


class PercentileObserver(_HistogramObserver):
    """Clip at a percentile: ``T = P_p(|x|)`` (symmetric) or ``[P_(100-p)(x), P_p(x)]``.

    The percentiles are read off the growing histogram (``_Histogram``) by linear
    interpolation inside a bin, so the error is below one bin width (``<= 2 max|x| / bins``)
    and batched observation is close to, not identical with, observing at once. The range
    never goes past the observed min/max; ``percentile=100`` gives min-max.

    Args:
        percentile: in ``(0, 100]``, e.g. 99.99 keeps all but 1 in 10,000 values unclipped.
        bins: histogram bins on each side of 0 (a power of two).

    Example:
        >>> obs = PercentileObserver(percentile=90.0, symmetric=True)
        >>> _ = obs(torch.arange(-100.0, 101.0))
        >>> round(obs.clip_range()[1].item(), 1)
        90.0
    """

    def __init__(self, percentile: float = 99.99, bits: int = 8, symmetric: bool = False,
                 granularity: Granularity = PerTensor(), *, bins: int = 2048):
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(bits, symmetric, granularity, bins)
        self.percentile = percentile

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        if self.symmetric:
            t = self.hist.quantile(q, absolute=True)
            return torch.tensor(-t), torch.tensor(t)
        return torch.tensor(self.hist.quantile(1.0 - q)), torch.tensor(self.hist.quantile(q))
