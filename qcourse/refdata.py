"""Reference data that means the same on every CPU: inputs drawn identically everywhere, and
regenerated results compared exactly where they are exact and within a derived bound elsewhere.

A reference generator (``course/refgen/<lab>.py``) is run on the instructor's machine and its
files are committed; the hidden tests and the regeneration test read them on other machines.
Two things differ from one x86-64 CPU to another (or between torch's kernels for one CPU):

- **inputs**: torch draws float32 normals with vectorized log/cos on AVX2 and AVX-512 and with
  scalar ones otherwise (``ATEN_CPU_CAPABILITY=default``), so ``torch.randn`` differs in the last
  bits; float64 normals take the scalar path on every CPU, so :func:`randn` draws those and rounds.
- **results** of reductions (matrix products, sums, means) and of vectorized transcendental
  functions (exp, erf, tanh): the summation order and the polynomial depend on the instruction set.
  Integer codes, comparisons and results of single correctly rounded operations (``x / scale``,
  ``amax``, ``(q - z) * s``) do not.

A generator therefore declares which of its arrays are CPU-dependent and how long the longest
chain of float32 roundings behind each is (``CPU_DEPENDENT``); :func:`compare_references` checks
every other array bit for bit. It writes its files with :func:`write_references` and gets its
command line from :func:`generator_main`.
"""
from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

U32 = 2.0 ** -24  # unit roundoff of float32: one rounding moves a value by at most U32 * |value|


def randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Standard normal float32 samples that are bit-identical on every CPU (drawn in float64).

    >>> g = torch.Generator().manual_seed(0)
    >>> x = randn(4, 16, generator=g)
    >>> x.dtype, tuple(x.shape)
    (torch.float32, (4, 16))
    >>> bool(torch.equal(x, randn(4, 16, generator=torch.Generator().manual_seed(0))))
    True
    """
    return torch.randn(*shape, generator=generator, dtype=torch.float64).float()


def linspace(start: float, end: float, steps: int) -> torch.Tensor:
    """``torch.linspace`` in float64, rounded to float32 (the float32 kernel is vectorized differently
    on different CPUs).

    >>> linspace(-1.0, 1.0, 5).tolist()
    [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    return torch.linspace(start, end, steps, dtype=torch.float64).float()


def init_linears_(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Re-draw every ``nn.Linear``'s weight and bias from torch's default U(-1/sqrt(in), 1/sqrt(in)),
    identically on every CPU (torch's float32 ``uniform_`` is vectorized differently per CPU).

    >>> lin = init_linears_(torch.nn.Linear(4, 2), torch.Generator().manual_seed(0))
    >>> bool(lin.weight.abs().max() <= 0.5) and lin.weight.dtype == torch.float32
    True
    """
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                bound = layer.in_features ** -0.5
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
                        p.copy_(((u * 2 - 1) * bound).to(p.dtype))
    return model


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy copy of a tensor (detached, on the CPU): later in-place changes to ``t`` do not reach it.

    >>> t = torch.zeros(2)
    >>> a = to_numpy(t)
    >>> _ = t.add_(1.0)
    >>> a.tolist()
    [0.0, 0.0]
    """
    return t.detach().cpu().clone().numpy()


def write_references(out_dir: Path, files: Mapping[str, Mapping[str, object]]) -> Path:
    """Write ``{file stem: {key: array or scalar}}`` as ``out_dir/<stem>.npz`` (compressed, in the
    given order), creating ``out_dir``; the same arrays give the same bytes on every run.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = write_references(Path(tmp) / "lab", {"f": {"x": np.arange(3), "bits": 4}})
    ...     with np.load(out / "f.npz") as z:
    ...         (z["x"].tolist(), int(z["bits"]))
    ([0, 1, 2], 4)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, arrays in files.items():
        np.savez_compressed(out_dir / f"{stem}.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    return out_dir


def generator_main(make: Callable[[Path], None], lab: str, argv: list[str] | None = None) -> None:
    """The command line of a reference generator, ``python course/refgen/<lab>.py [OUT_DIR]``:
    ``make(OUT_DIR)``, by default into ``course/reference/<lab>`` (what ``qcourse references`` does).
    """
    from qcourse.build import COURSE

    parser = argparse.ArgumentParser(prog=f"{lab}.py", description=f"Write the reference files of {lab}.")
    parser.add_argument("out_dir", nargs="?", type=Path, default=COURSE / "reference" / lab,
                        help="folder for the .npz files (default: %(default)s)")
    make(parser.parse_args(argv).out_dir)


def reduction_bound(committed: np.ndarray, roundings: int) -> float:
    """How far a CPU-dependent float32 result may move: ``2 * roundings * U32 * max|value|``.

    Two evaluations of a sum of ``n`` terms in different orders each lie within about
    ``n * U32 * sum|terms|`` of the exact value (Higham, *Accuracy and Stability of Numerical
    Algorithms*, 4.2), so within twice that of each other; ``max|value|`` of the array stands
    for the size of its terms, and ``roundings`` is the longest chain behind one value (the
    reduction length, plus a few for each transcendental function or layer it passes).

    >>> reduction_bound(np.array([4.0, -2.0]), roundings=8) == 2 * 8 * 2.0 ** -24 * 4.0
    True
    """
    finite = np.abs(committed[np.isfinite(committed)])
    return 2 * roundings * U32 * (float(finite.max()) if finite.size else 0.0)


def _rule(cpu_dependent: dict, file: str, key: str) -> int | None:
    for pattern, roundings in cpu_dependent.get(file, {}).items():
        if fnmatch.fnmatchcase(key, pattern):
            return roundings
    return None


def compare_arrays(fresh: np.ndarray, committed: np.ndarray, roundings: int | None) -> str | None:
    """Why ``fresh`` is not an acceptable regeneration of ``committed`` (None when it is).

    ``roundings=None``: the array must be bit-identical (integers, inputs, exact results).

    >>> a = np.array([1.0, 2.0], np.float32)
    >>> compare_arrays(a + np.float32(2 ** -22), a, roundings=4) is None
    True
    >>> compare_arrays(a + np.float32(2 ** -22), a, roundings=None)
    'not bit-identical (exact result): max |difference| 2.38e-07'
    >>> compare_arrays(np.array([np.inf, 1.0]), np.array([np.inf, 1.0 + 1e-9]), roundings=4) is None
    True
    >>> compare_arrays(a + 1e-3, a, roundings=4)
    'differs by 0.001, beyond 9.54e-07 (2 x 4 float32 roundings x max|value| 2)'
    """
    if fresh.shape != committed.shape or fresh.dtype != committed.dtype:
        return f"shape/dtype {fresh.shape} {fresh.dtype} != committed {committed.shape} {committed.dtype}"
    floating = committed.dtype.kind in "fc"
    if np.array_equal(fresh, committed, equal_nan=floating):
        return None
    if not floating:
        return f"not identical (integer/exact data): {int((fresh != committed).sum())} of {fresh.size} differ"
    finite = np.isfinite(committed)
    if not (np.array_equal(finite, np.isfinite(fresh))
            and np.array_equal(fresh[~finite], committed[~finite], equal_nan=True)):
        return "NaN or infinities in other places (they must match exactly)"
    diff = float(np.abs(fresh[finite].astype(np.float64) - committed[finite].astype(np.float64)).max())
    if roundings is None:
        return f"not bit-identical (exact result): max |difference| {diff:.3g}"
    bound = reduction_bound(committed, roundings)
    if diff <= bound:
        return None
    scale = float(np.abs(committed[finite]).max())
    return f"differs by {diff:.3g}, beyond {bound:.3g} (2 x {roundings} float32 roundings x max|value| {scale:.3g})"


def compare_references(fresh_dir: Path, committed_dir: Path, cpu_dependent: dict) -> list[str]:
    """Every difference between a regenerated reference folder and the committed one that its
    generator's ``cpu_dependent`` declaration does not allow; an empty list when they agree.

    ``cpu_dependent`` maps a file's stem to ``{key pattern: float32 roundings}`` (fnmatch patterns).
    """
    fresh_dir, committed_dir = Path(fresh_dir), Path(committed_dir)
    problems = []
    fresh_names = sorted(p.name for p in fresh_dir.glob("*.npz"))
    committed_names = sorted(p.name for p in committed_dir.glob("*.npz"))
    if fresh_names != committed_names:
        return [f"files {fresh_names} != committed {committed_names}"]
    for name in fresh_names:
        stem = name[:-len(".npz")]
        with np.load(fresh_dir / name) as fresh, np.load(committed_dir / name) as old:
            if sorted(fresh.files) != sorted(old.files):
                problems.append(f"{name}: keys {sorted(set(fresh.files) ^ set(old.files))} only on one side")
                continue
            for key in fresh.files:
                why = compare_arrays(fresh[key], old[key], _rule(cpu_dependent, stem, key))
                if why:
                    problems.append(f"{name}:{key}: {why}")
    return problems
