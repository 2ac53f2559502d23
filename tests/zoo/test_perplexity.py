"""qcore.zoo.perplexity: sliding windows score each token once, agree with transformers' own loss,
give the vocabulary size for a uniform model, and pair two models' errors over shared blocks.

Fast tests use a random 2-layer Llama (``tiny_causal_lm``) and two hand-made models: a uniform one
and a bigram one (its prediction depends on the previous token only, so any window gives the same
numbers). The real SmolLM2 on the real novels is a slow test; its timings are in the lab's notes.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from qcore.zoo import perplexity as P
from qcore.zoo.causal_lm import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Bigram(torch.nn.Module):
    """``logits[t] = table[x_t]``: no attention, so context length cannot change a prediction.
    Its forward has no ``logits_to_keep``: the path that slices full logits."""

    def __init__(self, vocab: int = 50, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])  # [b, L, vocab]


class Uniform(Bigram):
    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.table.shape[0]))


class NoKeep(torch.nn.Module):
    """A model whose forward takes no ``logits_to_keep`` (as a hand-written wrapper might)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids)


def ids_of(n: int, vocab: int = 49152, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,window,stride", [(37, 16, 16), (37, 16, 5), (37, 16, 1), (16, 16, 8),
                                             (10, 16, 4), (17, 16, 15), (2, 8, 8)])
def test_every_token_after_the_first_is_scored_exactly_once(n, window, stride):
    ids = ids_of(n, vocab=50)
    model = Bigram()
    got = P.perplexity(model, ids, window=window, stride=stride)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="none")
    assert got.n_tokens == sum(got.block_sizes) == n - 1
    torch.testing.assert_close(got.token_nll, want.double(), atol=1e-6, rtol=1e-6)  # in order, once each
    assert all(size <= max(1, min(stride, window - 1)) for size in got.block_sizes[1:])


def test_a_window_over_the_whole_text_is_transformers_own_loss():
    model, ids = tiny_causal_lm(seed=2), ids_of(48)
    got = P.perplexity(model, ids, window=48, stride=48)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()  # mean over the 47 targets
    assert got.n_tokens == 47 and got.block_sizes == (47,) and math.isnan(got.se)
    assert got.nll == pytest.approx(loss, abs=1e-5) and got.perplexity == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("window,stride", [(16, 6), (16, 16)])
def test_each_token_sees_the_context_the_docstring_promises(window, stride):
    """Token t's NLL is that of one forward over ids[b:t+1] with at most ``window`` tokens and at
    least ``window - stride`` (>= 1) of context; found by trying every such b independently."""
    model, ids = tiny_causal_lm(seed=1), ids_of(40, seed=1)
    got = P.perplexity(model, ids, window=window, stride=stride)
    least = max(window - stride, 1)
    with torch.no_grad():
        for t in range(1, len(ids)):
            starts = range(max(0, t + 1 - window), t - min(t, least) + 1)
            candidates = [torch.log_softmax(model(input_ids=ids[None, b:t]).logits[0, -1], -1)[ids[t]].item()
                          for b in starts]
            assert min(abs(-c - got.token_nll[t - 1].item()) for c in candidates) < 1e-5, t


def test_batches_and_the_logits_to_keep_shortcut_change_nothing():
    model, ids = tiny_causal_lm(seed=3), ids_of(70, seed=3)
    one = P.perplexity(model, ids, window=16, stride=5)
    torch.testing.assert_close(P.perplexity(model, ids, window=16, stride=5, batch_size=4).token_nll,
                               one.token_nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(P.perplexity(NoKeep(model), ids, window=16, stride=5).token_nll,
                               one.token_nll, atol=1e-5, rtol=1e-5)


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    got = P.perplexity(Uniform(vocab=50), ids_of(100, vocab=50), window=32, stride=16)
    assert got.perplexity == pytest.approx(50, rel=1e-6) and got.se == pytest.approx(0, abs=1e-9)
    assert got.interval == pytest.approx((50, 50), rel=1e-6) and "perplexity 50.000" in str(got)


def test_block_mean_is_the_usual_standard_error_for_blocks_of_one():
    x = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, se = P.block_mean(x, torch.ones(200))
    assert mean == pytest.approx(x.mean().item()) and se == pytest.approx((x.std() / 200**0.5).item())
    # token-weighted: blocks of 1 and 3 tokens with sums 2 and 6 have mean (2 + 6) / 4
    assert P.block_mean(torch.tensor([2.0, 6.0]), torch.tensor([1, 3]))[0] == 2.0


def test_correlated_tokens_widen_the_standard_error():
    """Blocks whose tokens share a level: the batch-means error sees the spread of the levels, which
    ``std / sqrt(n_tokens)`` would miss (it treats 1000 tokens as 1000 independent draws)."""
    gen = torch.Generator().manual_seed(0)
    levels = torch.randn(20, generator=gen, dtype=torch.float64).repeat_interleave(50)  # 20 blocks
    tokens = levels + 0.1 * torch.randn(1000, generator=gen, dtype=torch.float64)
    _, se = P.block_mean(tokens.reshape(20, 50).sum(1), torch.full((20,), 50))
    naive = (tokens.std() / 1000**0.5).item()
    assert se > 3 * naive


def test_paired_difference_over_shared_blocks():
    ids = ids_of(80, seed=4)
    a = P.perplexity(tiny_causal_lm(seed=0), ids, window=16, stride=8)
    b = P.perplexity(tiny_causal_lm(seed=1), ids, window=16, stride=8)
    d = P.paired_nll_difference(a, b)
    assert d.diff == pytest.approx(a.nll - b.nll, abs=1e-12) and d.ratio == pytest.approx(a.perplexity / b.perplexity)
    assert d.n_tokens == 79 and d.n_blocks == len(a.block_sizes) and d.interval[0] < d.ratio < d.interval[1]
    same = P.paired_nll_difference(a, a)
    assert same.diff == 0 and same.se == 0
    with pytest.raises(ValueError, match="same tokens"):
        P.paired_nll_difference(a, P.perplexity(tiny_causal_lm(seed=0), ids_of(80, seed=5), window=16, stride=8))
    with pytest.raises(ValueError, match="same tokens"):
        P.paired_nll_difference(a, P.perplexity(tiny_causal_lm(seed=0), ids, window=16, stride=4))


def test_pairing_cancels_what_two_models_share():
    """b is a plus a small per-token change: the paired error is far below either model's own."""
    gen = torch.Generator().manual_seed(0)
    sizes = (50,) * 20
    base = torch.randn(20, generator=gen, dtype=torch.float64).repeat_interleave(50) + 3
    noise = 0.01 * torch.randn(1000, generator=gen, dtype=torch.float64)

    def result(token_nll):
        mean, se = P.block_mean(torch.stack([t.sum() for t in token_nll.split(sizes)]), torch.tensor(sizes))
        return P.Perplexity(math.exp(mean), mean, se, 1000, token_nll, sizes, "same text")

    a, b = result(base), result(base + 0.05 + noise)
    d = P.paired_nll_difference(b, a)
    assert d.diff == pytest.approx(0.05, abs=0.005) and d.se < a.se / 20


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        P.perplexity(Bigram(), ids_of(10, vocab=50), window=8, stride=9)
    with pytest.raises(ValueError, match="two tokens"):
        P.perplexity(Bigram(), ids_of(1, vocab=50), window=8, stride=4)


def by_char(text, **kw):
    return {"input_ids": [ord(c) for c in text]}


def test_austen_tokens_join_the_titles_in_order_and_slice():
    books = {"A": "ab", "B": "cd", "C": "ef"}
    assert P.austen_tokens(by_char, ["C", "A"], books=books).tolist() == [ord(c) for c in "ef\n\nab"]
    assert P.austen_tokens(by_char, "B", 1, books=books).tolist() == [ord("c")]
    with pytest.raises(KeyError, match="Emma"):
        P.austen_tokens(by_char, ["Emma"], books=books)
    with pytest.raises(ValueError, match="fewer than the 9"):
        P.austen_tokens(by_char, ["A"], 9, books=books)


@pytest.mark.slow
def test_smollm2_on_held_out_austen():
    from qcore.zoo import austen
    from qcore.zoo.causal_lm import causal_lm_dir, load_causal_lm

    if not austen.austen_ready() or not (causal_lm_dir() / "model.safetensors").is_file():
        pytest.skip("the novels or SmolLM2 are not prepared: run `python -m qcore.zoo prepare`")
    model, tok = load_causal_lm()
    ids = P.austen_tokens(tok, ["Persuasion", "Northanger Abbey"], 1024)
    assert P.austen_tokens(tok, ["Persuasion"], 100).tolist() == ids[:100].tolist()
    short = P.perplexity(model, ids, window=256, stride=256)
    long = P.perplexity(model, ids, window=512, stride=256)
    assert 5 < long.perplexity < 60 and 0 < long.se < 0.3
    assert long.nll < short.nll  # more context helps
    with pytest.raises(ValueError, match="window and stride"):  # other windows, other blocks: not paired
        P.paired_nll_difference(short, long)
