"""Training and evaluation loops, seeding, and the device / dtype policy of the labs.

Policy: CUDA when present (bf16 compute where the card supports it, else fp16), otherwise
the CPU in fp32 (bf16 matmuls are slow on most CPUs). Progress bars go to stdout (or a
notebook widget) and switch off under nbgrader, which scores a cell 0 when it writes to stderr.
"""
from __future__ import annotations

import math
import os
import random
import sys
from typing import Iterable, Sequence

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
    """bf16 on GPUs that support it (Ampere and newer), fp16 on older GPUs, fp32 on the CPU.

    Example:
        >>> compute_dtype("cpu")
        torch.float32
    """
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that runs repeat.

    Example:
        >>> seed_everything(3); a = torch.rand(2); seed_everything(3); torch.equal(a, torch.rand(2))
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def progress(iterable: Iterable, desc: str = "", total: int | None = None, **kw):
    """A tqdm progress bar on stdout (a widget in notebooks); silent under nbgrader and in logs.

    A bar redrawn with carriage returns is noise where nobody watches a terminal: when stdout is
    neither a terminal nor a Jupyter kernel's (a CI log, a pipe), no bar is drawn.

    Example:
        >>> sum(progress(range(3), disable=True))
        3
    """
    from tqdm.auto import tqdm

    watched = "ipykernel" in sys.modules or getattr(sys.stdout, "isatty", lambda: False)()
    kw.setdefault("disable", under_grader() or not watched)
    return tqdm(iterable, desc=desc, total=total, file=sys.stdout, leave=False, **kw)


def batches(n: int, batch_size: int, shuffle: bool = False, seed: int = 0) -> list[list[int]]:
    """Index batches covering ``range(n)``, shuffled with a fixed seed when asked.

    Example:
        >>> batches(5, 2)
        [[0, 1], [2, 3], [4]]
    """
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           pool: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length items: less padding, so faster steps on a CPU.

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


# ----------------------------------------------------------------------------- classification
def _encode(tokenizer, texts: Sequence[str], device: str, max_length: int):
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def predict_classifier(model, tokenizer, texts: Sequence[str], batch_size: int = 64,
                       max_length: int = 128, desc: str = "predict") -> torch.Tensor:
    """Predicted class per text (a LongTensor), in batches, with the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device.type if any(True for _ in model.parameters()) else "cpu"
    preds = []
    for idx in progress(batches(len(texts), batch_size), desc=desc):
        logits = model(**_encode(tokenizer, [texts[i] for i in idx], device, max_length)).logits
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def evaluate_classifier(model, tokenizer, split, batch_size: int = 64, max_length: int = 128,
                        limit: int | None = None) -> float:
    """Accuracy of ``model`` on ``split`` (``.texts``, ``.labels``); ``limit`` takes the first N."""
    texts, labels = split.texts[:limit], split.labels[:limit]
    preds = predict_classifier(model, tokenizer, texts, batch_size, max_length, desc="evaluate")
    return (preds == torch.tensor(labels)).float().mean().item()


def train_classifier(model, tokenizer, split, epochs: float = 1.0, lr: float = 5e-5,
                     batch_size: int = 32, max_length: int = 128, weight_decay: float = 0.01,
                     warmup: float = 0.1, seed: int = 0) -> list[float]:
    """Fine-tune a sequence classifier with AdamW and a linear warm-up/decay schedule.

    Returns the loss of each step. ``epochs`` may be fractional (a shortened run).
    """
    seed_everything(seed)
    device = next(model.parameters()).device.type
    steps_per_epoch = math.ceil(len(split.texts) / batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n_warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / n_warm, max(0.0, (total - s) / max(1, total - n_warm))))
    lengths = [len(t) for t in split.texts]  # characters: a cheap proxy for tokens
    plan = [b for e in range(math.ceil(epochs))
            for b in length_grouped_batches(lengths, batch_size, seed=seed + e)][:total]
    labels = torch.tensor(split.labels)
    model.train()
    losses = []
    bar = progress(plan, desc="train")
    for idx in bar:
        enc = _encode(tokenizer, [split.texts[i] for i in idx], device, max_length)
        out = model(**enc, labels=labels[idx].to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------- causal LM
def lm_labels(input_ids: torch.Tensor, prompt_lengths: Sequence[int],
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for causal-LM training with the prompt masked out (-100 is ignored by the loss).

    Args:
        input_ids: ``[batch, seq]`` right-padded token ids.
        prompt_lengths: tokens per row that belong to the prompt (no loss on them).

    Example:
        >>> lm_labels(torch.tensor([[5, 6, 7, 8]]), [2]).tolist()
        [[-100, -100, 7, 8]]
    """
    labels = input_ids.clone()
    for row, n in enumerate(prompt_lengths):
        labels[row, :n] = -100
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    return labels


def lm_loss(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def train_causal_lm(model, batch_iter: Sequence[dict], lr: float = 2e-4, weight_decay: float = 0.0,
                    seed: int = 0) -> list[float]:
    """Train on prepared batches (dicts of input_ids, attention_mask, labels); returns losses.

    Only parameters with ``requires_grad`` are optimised (LoRA adapters, for instance).
    """
    seed_everything(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    bar = progress(batch_iter, desc="train")
    for batch in bar:
        loss = lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def evaluate_causal_lm(model, batch_iter: Sequence[dict]) -> tuple[float, float]:
    """Token-weighted mean loss and perplexity ``exp(loss)`` over prepared batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in progress(batch_iter, desc="evaluate"):
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).item() * n
        count += n
    loss = total / max(1, count)
    return loss, math.exp(loss)
