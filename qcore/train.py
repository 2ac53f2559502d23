"""The one training loop and the one evaluation, seeding, and the device / dtype policy of the labs.

Policy: CUDA when present (bf16 compute where the card supports it, else fp16), otherwise
the CPU in fp32 (bf16 matmuls are slow on most CPUs). Progress bars go to stdout (or a
notebook widget) and switch off under nbgrader, which scores a cell 0 when it writes to stderr.

Training: ``train(model, batches, loss)`` is every loop of the course (the classifier's setup
fine-tuning, lab 4's QAT, lab 5's LoRA/QLoRA); a task brings its batches and its loss
(``classifier_batches`` + ``classifier_loss`` here, ``qcore.zoo.prompted_sentiment`` for the LM).
Evaluation: batches of similar length in one fixed order (``length_sorted_batches``), the results
put back in the order of the texts (``classifier_logits``). Some quantized models (torch.ao's
dynamic int8: one activation scale per padded batch) answer differently when sentences share
other batches, so every accuracy of a classifier in the course is measured in this one order.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch


def pick_device() -> str:
    """``"cuda"`` when a GPU is usable, else ``"cpu"``.

    Example:
        >>> pick_device() in ("cuda", "cpu")
        True
    """
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs that compute it natively (Ampere and newer), fp16 on older GPUs, fp32 on the CPU.

    ``torch.cuda.is_bf16_supported()`` alone also says yes where bf16 is only emulated (a T4 on
    Colab), which is slow there: emulation does not count.

    Example:
        >>> compute_dtype("cpu")
        torch.float32
    """
    if device.startswith("cuda"):
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.float32


def native_bf16() -> bool:
    """True when the current CUDA GPU computes bf16 in hardware (not emulated)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that runs repeat.

    Example:
        >>> seed_everything(3); a = torch.rand(2); seed_everything(3); torch.equal(a, torch.rand(2))
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def random_state_kept():
    """Run a block without moving Python's, NumPy's or torch's random state for what comes after.

    A model prepared on first use trains with its own seed, inside a lab; the lab's next cells
    then draw the same numbers as when the model was already there.

    Example:
        >>> seed_everything(3); a = torch.rand(2)
        >>> seed_everything(3)
        >>> with random_state_kept():
        ...     seed_everything(9); _ = torch.rand(5)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def set_threads(n: int | None = None) -> int:
    """Use ``n`` torch threads (default: the cores this process may run on); returns it.

    Example:
        >>> set_threads() >= 1
        True
    """
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def under_grader() -> bool:
    """True while nbgrader executes the notebook (it sets ``NBGRADER_EXECUTION``).

    Example:
        >>> under_grader() == bool(os.environ.get("NBGRADER_EXECUTION"))
        True
    """
    return bool(os.environ.get("NBGRADER_EXECUTION"))


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (its shell is running), not merely where ipykernel was imported."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress(iterable: Iterable, desc: str = "", total: int | None = None, **kw):
    """A tqdm progress bar on stdout (a widget in notebooks); silent under nbgrader and in logs.

    A bar redrawn with carriage returns is noise where nobody watches a terminal: when stdout is
    neither a terminal nor a Jupyter kernel's (a CI log, a pipe), no bar is drawn. ``disable=True``
    switches a bar off (a loop too short for one); nothing switches it on against these rules.

    Example:
        >>> sum(progress(range(3), disable=True))
        3
    """
    from tqdm.auto import tqdm

    watched = _in_kernel() or getattr(sys.stdout, "isatty", lambda: False)()
    kw["disable"] = bool(kw.get("disable")) or under_grader() or not watched
    return tqdm(iterable, desc=desc, total=total, file=sys.stdout, leave=False, **kw)


# ----------------------------------------------------------------------------- batch orders
def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           pool: int = 50) -> list[list[int]]:
    """Training order: shuffled batches of similar-length items (less padding, faster steps).

    Items are shuffled, cut into pools of ``pool`` batches, sorted by length inside each pool,
    batched, and the batches shuffled again; every index appears exactly once.

    Example:
        >>> b = length_grouped_batches([5, 1, 4, 2, 3, 6], batch_size=2, pool=3)
        >>> sorted(i for batch in b for i in batch)
        [0, 1, 2, 3, 4, 5]
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = pool * batch_size
    out = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start:start + size], key=lambda i: lengths[i])
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation order, the one of the course: items sorted by length (ties keep their order), cut.

    Example:
        >>> length_sorted_batches([3, 1, 2, 1, 5], batch_size=2)
        [[1, 3], [2, 0], [4]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------- the training loop
@dataclass
class TrainRun:
    """What ``train`` records: the loss and the wall time (seconds) of every step."""

    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def train(model, batches: Sequence, loss: Callable, lr: float, weight_decay: float = 0.0,
          warmup: float = 0.0, decay: bool = True, clip: float | None = 1.0, seed: int = 0,
          on_step: Callable[[int], None] | None = None, desc: str = "train",
          autocast: torch.dtype | None = None) -> TrainRun:
    """The course's training loop: AdamW on the parameters that require a gradient, one step per batch.

    The learning rate at step ``s`` of ``n`` is ``lr * min((s + 1) / w, (n - s) / (n - w))`` with
    ``w = int(warmup * n)`` warm-up steps (no warm-up term when ``w == 0``), or ``lr`` throughout
    when ``decay`` is False. Gradients are clipped to norm ``clip`` (``None``: not clipped).

    Args:
        batches: whatever ``loss`` takes, already on the model's device, one per step.
        loss: ``loss(model, batch)`` -> a scalar tensor (e.g. ``classifier_loss``).
        on_step: called with the step's index before its forward pass (lab 4 freezes observers).
        autocast: mixed precision: the forward and the loss run under ``torch.autocast`` in this
            dtype (bf16 or fp16) while the weights stay as they are, FP32 master weights that
            AdamW updates. A learning-rate-sized step is often below half a BF16 step of a weight
            (2**-9 relative): pure-BF16 weights would drop it. fp16 scales the loss
            (``torch.amp.GradScaler``) so that small gradients do not flush to 0.

    Returns:
        A ``TrainRun`` (the model is left in eval mode).

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> data = [(torch.ones(4, 2), torch.full((4, 1), 3.0))] * 50
        >>> mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> run = train(m, data, mse, lr=0.1, decay=False, desc="")
        >>> len(run.losses), run.losses[-1] < 0.01 * run.losses[0]
        (50, True)
    """
    seed_everything(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total, n_warm = len(batches), int(warmup * len(batches))

    def factor(s: int) -> float:
        if not decay:
            return 1.0
        ramp = (s + 1) / n_warm if n_warm else 1.0
        return min(ramp, max(0.0, (total - s) / max(1, total - n_warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    cuda = any(p.is_cuda for p in params)
    where = "cuda" if cuda else "cpu"
    scaler = torch.amp.GradScaler(where, enabled=autocast == torch.float16)
    mixed = torch.autocast(where, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    model.train()
    run = TrainRun()
    bar = progress(batches, desc=desc)
    for step, batch in enumerate(bar):
        start = time.perf_counter()
        if on_step is not None:
            on_step(step)
        with mixed:
            value = loss(model, batch)
        scaler.scale(value).backward()
        scaler.unscale_(opt)  # the true gradients, before clipping
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)      # skips the step when fp16 overflowed (and lowers the scale)
        scaler.update()
        with warnings.catch_warnings():  # after a skipped fp16 step torch warns that the rate moved first
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()  # the step's real time, not its launch
        run.seconds.append(time.perf_counter() - start)
        run.losses.append(value.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}")
    model.eval()
    return run


# ----------------------------------------------------------------------------- classification
def classifier_batches(tokenizer, texts: Sequence[str], labels: Sequence[int] | None = None,
                       batch_size: int = 64, max_length: int = 128, shuffle: bool = False,
                       epochs: int = 1, steps: int | None = None, seed: int = 0,
                       device: str = "cpu") -> list[dict]:
    """Tokenized batches of sentences, each padded to its longest: the evaluation or the training order.

    ``shuffle=False``: the evaluation order (``length_sorted_batches``), every text once.
    ``shuffle=True``: ``epochs`` passes in the training order (``length_grouped_batches``, seed
    ``seed + epoch``), cut to the first ``steps`` batches when given. Lengths are counted in
    characters, a cheap proxy for tokens. Each dict has ``input_ids`` and ``attention_mask``
    (``[b, seq]``), ``index`` (``[b]``, the texts' positions) and, with ``labels``, ``labels``.

    Example:
        >>> from qcore.zoo.sentiment import load_tokenizer
        >>> b = classifier_batches(load_tokenizer(), ["a fine film", "bad", "good"], [1, 0, 1], batch_size=2)
        >>> [x["index"].tolist() for x in b], b[0]["input_ids"].shape, b[0]["labels"].tolist()
        ([[1, 2], [0]], torch.Size([2, 3]), [0, 1])
    """
    lengths = [len(t) for t in texts]
    if shuffle:
        plan = [b for e in range(epochs) for b in length_grouped_batches(lengths, batch_size, seed=seed + e)]
        plan = plan[:steps]
    else:
        plan = length_sorted_batches(lengths, batch_size)
    out = []
    for idx in plan:
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "index": torch.tensor(idx)}
        if labels is not None:
            batch["labels"] = torch.tensor([labels[i] for i in idx])
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def classifier_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of a sequence classifier on a batch of ``classifier_batches`` (with labels)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"]).loss


@torch.inference_mode()
def classifier_logits(model, batches: Sequence[dict], desc: str | None = "evaluate") -> torch.Tensor:
    """fp32 logits ``[texts, classes]`` of a classifier, in the texts' order (``desc=None``: no bar).

    Example:
        >>> from qcore.zoo.sentiment import load_tokenizer, tiny_sentiment_model
        >>> m, tok = tiny_sentiment_model(), load_tokenizer()
        >>> texts = ["a long and winding sentence", "short", "mid length"]
        >>> together = classifier_logits(m, classifier_batches(tok, texts), desc=None)
        >>> alone = torch.cat([classifier_logits(m, classifier_batches(tok, [t]), desc=None) for t in texts])
        >>> together.shape, torch.allclose(together, alone, atol=1e-5)
        (torch.Size([3, 2]), True)
    """
    model.eval()
    rows, where = [], []
    for batch in (batches if desc is None else progress(batches, desc=desc)):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows.append(logits.float().cpu())
        where.append(batch["index"].cpu())
    if not rows:
        return torch.empty(0, 2)
    out = torch.empty(sum(len(w) for w in where), rows[0].shape[1])
    out[torch.cat(where)] = torch.cat(rows)
    return out


def evaluate_classifier(model, tokenizer, split, batch_size: int = 64, max_length: int = 128,
                        limit: int | None = None, desc: str | None = "evaluate") -> float:
    """Accuracy of ``model`` on ``split`` (``.texts``, ``.labels``); ``limit`` takes the first N."""
    texts, labels = split.texts[:limit], split.labels[:limit]
    device = next(model.parameters()).device.type if any(True for _ in model.parameters()) else "cpu"
    batches = classifier_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length, device=device)
    preds = classifier_logits(model, batches, desc=desc).argmax(-1)
    return (preds == torch.tensor(labels)).float().mean().item()
