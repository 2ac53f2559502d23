"""Perplexity of a causal language model on held-out text, with its uncertainty (lab 6).

``perplexity(model, ids, window, stride)`` slides a window of ``window`` tokens over the text in
steps of ``stride``: every token after the first is scored exactly once, predicted from at least
``window - stride`` tokens of context (fewer only inside the first window; at least one token when
``stride == window``, where consecutive windows overlap by that one token). The result is the
token-weighted mean negative log-likelihood ``nll`` (nats per token) and ``perplexity = exp(nll)``.

Uncertainty: the tokens of a text are not independent (a hard paragraph is hard for many tokens in
a row), so ``std / sqrt(n_tokens)`` would be far too small. We use batch means: each window's
newly scored tokens form one block, and the standard error is that of a ratio of block sums
(clustered by block). Correlation between neighbouring blocks is assumed small. Two models scored
on the same tokens with the same window and stride share the blocks, so their difference is judged
paired (``paired_nll_difference``): what is hard for one is hard for the other, and cancels.

``austen_tokens`` turns the held-out novels (``qcore.zoo.austen``) into a fixed slice of tokens.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qcore.train import progress


def block_mean(sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """Token-weighted mean ``sum(sums) / sum(counts)`` and its standard error by batch means.

    ``sums[b]`` adds the values of block ``b``, ``counts[b]`` counts them (``[blocks]`` each). The
    blocks are the independent units: ``se**2 = B / (B - 1) * sum((sums - mean * counts)**2) /
    sum(counts)**2`` (the ratio estimator's linearized variance; blocks of one value each give the
    usual ``std / sqrt(n)``, ``std`` with divisor ``n - 1``). One block gives ``se = nan``.

    Example:
        >>> block_mean(torch.tensor([3.0, 5.0]), torch.tensor([2, 2]))
        (2.0, 0.5)
    """
    sums, counts = sums.double(), counts.double()
    mean = (sums.sum() / counts.sum()).item()
    blocks = len(sums)
    if blocks < 2:
        return mean, math.nan
    resid = sums - mean * counts
    return mean, math.sqrt(blocks / (blocks - 1) * (resid**2).sum().item()) / counts.sum().item()


@dataclass(frozen=True)
class Perplexity:
    """A perplexity measurement: ``perplexity = exp(nll)``, ``nll`` in nats per token ± ``se``."""

    perplexity: float
    nll: float
    se: float
    n_tokens: int
    token_nll: torch.Tensor = field(repr=False)  # [n_tokens] float64, in text order
    block_sizes: tuple[int, ...] = field(repr=False)  # tokens scored by each window, in order
    text: str = field(repr=False)  # fingerprint of the token ids (which text was scored)

    @property
    def interval(self) -> tuple[float, float]:
        """``(exp(nll - se), exp(nll + se))``: the perplexity's one-standard-error interval."""
        return math.exp(self.nll - self.se), math.exp(self.nll + self.se)

    def __str__(self) -> str:
        lo, hi = self.interval
        return (f"perplexity {self.perplexity:.3f} [{lo:.3f}, {hi:.3f}] "
                f"(nll {self.nll:.4f} ± {self.se:.4f} nats/token, {self.n_tokens} tokens)")


@dataclass(frozen=True)
class NllDifference:
    """``a.nll - b.nll`` on the same tokens, with its paired standard error over the shared blocks."""

    diff: float
    se: float
    n_tokens: int
    n_blocks: int

    @property
    def ratio(self) -> float:
        """Perplexity ratio ``a / b = exp(diff)``."""
        return math.exp(self.diff)

    @property
    def interval(self) -> tuple[float, float]:
        """The ratio's one-standard-error interval ``(exp(diff - se), exp(diff + se))``."""
        return math.exp(self.diff - self.se), math.exp(self.diff + self.se)

    def __str__(self) -> str:
        return (f"nll difference {self.diff:+.4f} ± {self.se:.4f} nats/token "
                f"(perplexity x{self.ratio:.4f}, {self.n_tokens} tokens in {self.n_blocks} blocks)")


def _fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, first_scored, end)`` per window: it reads ids ``[begin, end)`` and scores the
    targets ``[first_scored, end)``; together the windows score ``1 .. n-1`` once each."""
    end = min(window, n)
    out = [(0, 1, end)]  # token 0 has no context: it is never a target
    step = min(stride, window - 1)  # a target needs one token before it inside its window
    while end < n:
        first, end = end, min(end + step, n)
        out.append((max(0, end - window), first, end))  # a full window: the most context it can have
    return out


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, window: int = 1024, stride: int = 512,
               batch_size: int = 1, desc: str = "perplexity") -> Perplexity:
    """Sliding-window perplexity of ``model`` on the token ids ``[n]`` (one text).

    ``nll = -1/(n-1) * sum_t log p(x_t | x_max(0, b_t) .. x_{t-1})`` over the targets ``t = 1 .. n-1``,
    where ``b_t`` is the start of the window that scores ``t``. ``stride == window`` cuts the text in
    chunks that overlap by one token (each window scores ``window - 1`` tokens; least context,
    fastest); ``stride < window`` gives each scored token at least ``window - stride`` tokens of
    context at about ``window / stride`` times the cost. Windows of the same
    shape run ``batch_size`` at a time (helps on a GPU). Standard error: batch means over the
    windows (see the module docstring).

    Args:
        model: a causal LM called as ``model(input_ids=[b, L]).logits -> [b, L, vocab]``.
        input_ids: ``[n]`` token ids (a ``[1, n]`` row is accepted).
        window: tokens the model reads at once (at most its context length).
        stride: new tokens scored per window (``window - 1`` at most), ``1 <= stride <= window``.

    Example:
        >>> from qcore.zoo.causal_lm import tiny_causal_lm
        >>> p = perplexity(tiny_causal_lm(), torch.arange(1, 41), window=16, stride=8)
        >>> p.n_tokens, p.block_sizes, round(math.log(p.perplexity), 6) == round(p.nll, 6)
        (39, (15, 8, 8, 8), True)
    """
    ids = input_ids.reshape(-1)
    if not 1 <= stride <= window or window < 2 or ids.numel() < 2:
        raise ValueError(f"need 1 <= stride <= window, window >= 2 and two tokens (stride {stride}, window {window}, "
                         f"{ids.numel()} tokens)")
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    keep_arg = "logits_to_keep" in inspect.signature(base.forward).parameters
    spans = _windows(ids.numel(), window, stride)
    # Windows of one shape (length, unscored context) run together: all but the first and last.
    shape = lambda span: (span[2] - span[0], span[1] - span[0])  # noqa: E731 - (length, context)
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < batch_size and shape(groups[-1][0]) == shape(span):
            groups[-1].append(span)
        else:
            groups.append([span])
    nlls = []
    for group in progress(groups, desc=desc, disable=len(groups) < 3):
        _, first, end = group[0]  # every window of a group has this shape
        x = torch.stack([ids[b:e] for b, _, e in group]).to(device)  # [b, L]
        keep = end - first + 1  # the logits predicting targets first..end-1 (and one past the end)
        logits = model(input_ids=x, logits_to_keep=keep).logits if keep_arg else model(input_ids=x).logits
        logits = logits[:, -keep:-1].float()  # [b, end - first, vocab]
        targets = torch.stack([ids[f:e] for _, f, e in group]).to(device)  # [b, end - first]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [b, end - first]
        nlls.extend(nll.double().cpu())
    sizes = torch.tensor([len(t) for t in nlls])
    token_nll = torch.cat(nlls)
    mean, se = block_mean(torch.stack([t.sum() for t in nlls]), sizes)
    return Perplexity(math.exp(mean), mean, se, token_nll.numel(), token_nll,
                      tuple(sizes.tolist()), _fingerprint(ids))


def paired_nll_difference(a: Perplexity, b: Perplexity) -> NllDifference:
    """``a.nll - b.nll`` and its paired standard error: both measured on the same tokens and blocks.

    The per-token differences are grouped by the shared blocks (windows) and ``block_mean`` gives
    the standard error; it is far smaller than either measurement's own when the two models find the
    same passages hard. ``ratio = exp(diff)`` is the perplexity ratio ``a / b``.

    Example:
        >>> from qcore.zoo.causal_lm import tiny_causal_lm
        >>> ids = torch.arange(1, 41)
        >>> a, b = (perplexity(tiny_causal_lm(s), ids, window=16, stride=8) for s in (0, 1))
        >>> d = paired_nll_difference(a, b)
        >>> abs(d.diff - (a.nll - b.nll)) < 1e-12, d.n_blocks
        (True, 4)
    """
    if a.text != b.text or a.block_sizes != b.block_sizes:
        raise ValueError("a paired comparison needs the same tokens, window and stride for both models")
    sizes = torch.tensor(a.block_sizes)
    diffs = (a.token_nll - b.token_nll).split(a.block_sizes)
    diff, se = block_mean(torch.stack([d.sum() for d in diffs]), sizes)
    return NllDifference(diff, se, a.n_tokens, len(sizes))


def austen_tokens(tokenizer, titles, n_tokens: int | None = None, books: dict[str, str] | None = None) -> torch.Tensor:
    """The first ``n_tokens`` token ids ``[n_tokens]`` of the named novels, joined in the order given.

    The novels (``qcore.zoo.austen.load_austen``, or ``books``) are joined by a blank line and
    tokenized once, without special tokens; a fixed slice keeps every evaluation on the same text.
    Calibrate on one novel and evaluate on others, e.g. ``austen_tokens(tok, ["Emma"], 4096)`` and
    ``austen_tokens(tok, ["Persuasion", "Northanger Abbey"], 16384)``.

    Example:
        >>> by_char = lambda text, **kw: {"input_ids": [ord(c) for c in text]}  # a stand-in tokenizer
        >>> austen_tokens(by_char, ["A", "B"], 5, books={"A": "Emma", "B": "Anne"}).tolist()
        [69, 109, 109, 97, 10]
    """
    if isinstance(titles, str):
        titles = [titles]
    if books is None:
        from qcore.zoo.austen import load_austen

        books = load_austen()
    unknown = [t for t in titles if t not in books]
    if unknown:
        raise KeyError(f"unknown titles {unknown}; known: {list(books)}")
    text = "\n\n".join(books[t] for t in titles)
    # verbose=False: no "longer than the maximum sequence length" warning on stderr (whole novels)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if n_tokens is not None and n_tokens > ids.numel():
        raise ValueError(f"{titles} have {ids.numel()} tokens, fewer than the {n_tokens} asked for")
    return ids if n_tokens is None else ids[:n_tokens]
