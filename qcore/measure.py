"""What a model costs: parameter bytes, size on disk, latency and peak memory.

Every number a lab shows comes from here, measured on the machine it runs on.
"""
from __future__ import annotations

import io
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import psutil
import torch


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the parameters and buffers of ``model``, by dtype, plus ``"total"``.

    Tensors shared between modules (tied weights) are counted once.

    Example:
        >>> m = torch.nn.Linear(4, 2)                      # 8 weights + 2 biases, fp32
        >>> parameter_bytes(m)
        {'torch.float32': 40, 'total': 40}
        >>> parameter_bytes(m.half())['total']
        20
    """
    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        key = str(t.dtype)
        by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
    by_dtype["total"] = sum(by_dtype.values())
    return by_dtype


def size_on_disk(model_or_state: torch.nn.Module | dict) -> int:
    """Bytes of ``torch.save(state_dict)``: what the model takes as a file.

    Works for quantized modules too (their packed weights live in the state dict).

    Example:
        >>> m = torch.nn.Linear(256, 256)
        >>> size_on_disk(m) > 256 * 257 * 4, size_on_disk(m) < 256 * 257 * 4 + 2000
        (True, True)
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


@dataclass(frozen=True)
class Latency:
    """Timing of repeated calls: median and spread in milliseconds, and the threads used.

    Example:
        >>> print(Latency(2.0, 1.5, 3.0, 10, 2, "cpu"))
        2.00 ms median (p10 1.50, p90 3.00; 10 runs, 2 threads, cpu)
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    threads: int
    device: str

    def __str__(self) -> str:
        return (f"{self.median_ms:.2f} ms median (p10 {self.p10_ms:.2f}, p90 {self.p90_ms:.2f}; "
                f"{self.repeats} runs, {self.threads} threads, {self.device})")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_ms(fn: Callable[[], object], device: str) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _summary(times: list[float], device: str) -> Latency:
    times = sorted(times)

    def at(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return Latency(statistics.median(times), at(0.1), at(0.9), len(times),
                   torch.get_num_threads(), device)


def latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 20,
            device: str = "cpu") -> Latency:
    """Median wall time of ``fn()`` after ``warmup`` untimed calls (CUDA synchronised).

    The median resists the odd slow run (a page fault, another process); p10/p90 show spread.

    Example:
        >>> x = torch.randn(64, 64)
        >>> t = latency(lambda: x @ x, warmup=1, repeats=5)
        >>> t.repeats, t.median_ms > 0, t.threads == torch.get_num_threads()
        (5, True, True)
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    _sync(device)
    return _summary([_timed_ms(fn, device) for _ in range(repeats)], device)


def interleaved_latency(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 10,
                        device: str = "cpu", rounds: Callable[[range], Iterable] = iter) -> dict[str, Latency]:
    """Latency of several contenders measured in turns: every round calls each ``fn`` once.

    On a shared machine a busy spell then slows all contenders alike, so their *ratios* hold even
    when the absolute times move; timing one after the other would put the spell on one of them.
    ``rounds`` wraps the rounds (pass ``qcore.train.progress`` for a progress bar).

    Example:
        >>> x = torch.randn(128, 128)
        >>> t = interleaved_latency({"fp32": lambda: x @ x, "fp64": lambda: x.double() @ x.double()},
        ...                         warmup=1, repeats=5)
        >>> list(t), t["fp32"].repeats
        (['fp32', 'fp64'], 5)
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in rounds(range(warmup + repeats)):
        for name, fn in fns.items():
            ms = _timed_ms(fn, device)
            if r >= warmup:
                times[name].append(ms)
    return {name: _summary(t, device) for name, t in times.items()}


def peak_memory(fn: Callable[[], object], device: str = "cpu", interval_s: float = 0.001) -> int:
    """Peak extra memory (bytes) while ``fn()`` runs.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
    CPU: the process's resident set size (RSS), sampled every ``interval_s`` by a thread,
    above its value before the call. RSS sees everything (Python objects, allocator caches),
    so small differences are noise: compare sizes of tens of megabytes, not kilobytes.

    Example:
        >>> grow = lambda: torch.ones(64 * 2**20 // 4).add_(1)      # touches 64 MiB
        >>> peak_memory(grow) > 32 * 2**20
        True
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)

    proc = psutil.Process(os.getpid())
    baseline = proc.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
        peak = max(peak, proc.memory_info().rss)
    finally:
        done.set()
        sampler.join()
    return max(0, peak - baseline)


def describe_device() -> str:
    """One line saying where the labs compute: CPU model and threads, or the GPU and its dtype.

    Example:
        >>> "threads" in describe_device()
        True
    """
    cpu = platform.processor() or platform.machine()
    line = f"cpu {cpu}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        from qcore.train import native_bf16

        half = "bf16" if native_bf16() else "fp16"
        line += f"; cuda {name} ({half} compute)"
    return line


# What PyTorch reports of the CPU's vector and matrix instructions (``torch.cpu._is_*``: private,
# so each is looked up, and None where this PyTorch lacks it). They decide which dtypes have fast
# matrix kernels on a CPU: int8 (VNNI, AMX), BF16 (AVX512-BF16, AMX), FP16 (AMX-FP16 only).
CPU_UNITS = {"int8 dot products (VNNI)": "_is_vnni_supported",
             "BF16 dot products (AVX512-BF16)": "_is_avx512_bf16_supported",
             "AMX tiles (int8 and BF16 matrices)": "_is_amx_tile_supported",
             "AMX-FP16 (FP16 matrices)": "_is_amx_fp16_supported"}


def cpu_matrix_units() -> dict[str, bool | str | None]:
    """ATen's vector instruction set and the CPU's int8/BF16/FP16 matrix instructions, as PyTorch sees them.

    Example:
        >>> units = cpu_matrix_units()
        >>> isinstance(units["vector ISA"], str), sorted({type(v).__name__ for v in list(units.values())[1:]})
        (True, ['bool'])
    """
    out: dict[str, bool | str | None] = {"vector ISA": torch.backends.cpu.get_cpu_capability()}
    for label, fn in CPU_UNITS.items():
        probe = getattr(torch.cpu, fn, None)
        out[label] = None if probe is None else bool(probe())
    return out


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of ``a - b`` over paired measurements (the same sentences, seeds...) and its standard error.

    Pairing cancels what the two share (a hard sentence is hard for both): the standard error is
    ``std(a - b) / sqrt(n)``, far smaller than that of either mean when the two move together.

    Example:
        >>> mean, se = paired_difference([1.0, 2.0, 3.0, 4.0], [0.9, 2.1, 2.8, 3.8])
        >>> round(mean, 3), round(se, 3)
        (0.1, 0.071)
    """
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    if d.numel() < 2:
        raise ValueError("a paired difference needs at least two pairs")
    return d.mean().item(), (d.std() / d.numel() ** 0.5).item()


def mcnemar(a_correct, b_correct) -> tuple[int, int, float]:
    """McNemar's exact test of two classifiers on the same items: ``(a_only, b_only, p)``.

    ``a_only`` counts the items ``a`` gets right and ``b`` wrong, ``b_only`` the reverse; the items
    both get right or both wrong say nothing about which is better. Under "equally good" each
    discordant item is a fair coin, so ``p`` is the two-sided binomial probability of a split at
    least this uneven.

    Example:
        >>> mcnemar([1, 1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 1])   # 5 discordant items, all for a
        (5, 0, 0.0625)
    """
    a = torch.as_tensor(a_correct).bool()
    b = torch.as_tensor(b_correct).bool()
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return a_only, b_only, min(1.0, 2 * tail)


def bootstrap_se(statistic: Callable[..., torch.Tensor], *samples, resamples: int = 2000, seed: int = 0) -> float:
    """Standard error of ``statistic(*samples)`` by the paired bootstrap: the same items drawn for every sample.

    ``samples`` are tensors ``[n]`` over the same ``n`` items (sentences); each resample draws ``n``
    items with replacement and evaluates ``statistic`` on ``[resamples, n]`` rows at once (it must
    reduce over the last dimension).

    Example:
        >>> x = torch.arange(100.0) % 2          # half ones: the mean's standard error is 0.05
        >>> round(bootstrap_se(lambda v: v.mean(-1), x), 2)
        0.05
    """
    n = len(samples[0])
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=gen)
    values = statistic(*(torch.as_tensor(s, dtype=torch.float64)[idx] for s in samples))
    return values.std().item()
