"""qcore.zoo.prompted_sentiment: the prompt, its batches, the loss on the answer and the accuracy.

Fast tests use a random 2-layer Llama with SmolLM2's vocabulary and the real tokenizer; the slow
one asks the real SmolLM2 (its speed is measured by bench/bench_causal_lm.py).
"""
import pytest
import torch
import torch.nn.functional as F

from qcore.train import length_grouped_batches, length_sorted_batches, train
from qcore.zoo import prompted_sentiment as P
from qcore.zoo.causal_lm import load_causal_lm, load_causal_lm_tokenizer, prepare_causal_lm, tiny_causal_lm
from qcore.zoo.sentiment import Split, load_sentiment_data

TEXTS = ["Great fun.", "A dull, plodding and utterly forgettable mess of a film.",
         "The cast is superb.", "Nothing works.", "It's a charming, funny, warm-hearted little movie.",
         "  Too long.  ", "An ambitious failure that never finds its footing or its heart.", "Loved it!"]
LABELS = [1, 0, 1, 0, 1, 0, 0, 1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return load_causal_lm_tokenizer()


def _prompt(tok, text):
    return tok(P.sentiment_prompt(text, tok), add_special_tokens=False).input_ids


def _full_forward_answers(model, tok, texts):
    """``[n, vocab]`` logits at each prompt's last token, one prompt at a time, no tricks."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([_prompt(tok, t)])).logits[0, -1] for t in texts])


# ----------------------------------------------------------------------------- prompt
def test_prompt_is_chat_and_ends_before_the_label(tok):
    p = P.sentiment_prompt("  Great fun. ", tok)
    assert p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n" + P.ANSWER_PREFIX)
    assert "Sentence: Great fun.<|im_end|>" in p
    ids = tok(p, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


@pytest.mark.parametrize("text", TEXTS)
def test_label_words_are_single_tokens_after_the_prompt(tok, text):
    """Tokenizing prompt + word in one go gives the prompt's tokens plus exactly one more."""
    label_ids = P.label_token_ids(tok)
    assert len(set(label_ids)) == 2
    prompt = P.sentiment_prompt(text, tok)
    for word, wid in zip(P.LABEL_WORDS, label_ids):
        assert tok(prompt + word, add_special_tokens=False).input_ids == _prompt(tok, text) + [wid]
    assert tok.decode(label_ids) == "".join(P.LABEL_WORDS)


# ----------------------------------------------------------------------------- batches
def test_batches_hold_the_prompts_right_padded_with_their_targets(tok):
    got = P.sentiment_batches(tok, TEXTS[:7], LABELS[:7], batch_size=3)
    lengths = [len(_prompt(tok, t)) for t in TEXTS[:7]]
    assert [b["index"].tolist() for b in got] == length_sorted_batches(lengths, 3)  # the evaluation order
    label_ids = P.label_token_ids(tok)
    for b in got:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape == mask.shape and ids.dtype == b["targets"].dtype == torch.long
        assert (ids[mask == 0] == tok.pad_token_id).all() and mask.sum(1).max() == ids.shape[1]
        for r, i in enumerate(b["index"].tolist()):
            n = int(mask[r].sum())
            assert mask[r, :n].all() and not mask[r, n:].any()  # right padding
            assert ids[r, :n].tolist() == _prompt(tok, TEXTS[i]) and n == lengths[i]
            assert b["targets"][r] == label_ids[LABELS[i]]
    assert "targets" not in P.sentiment_batches(tok, TEXTS)[0]


def test_training_order_is_shuffled_by_length_and_seeded(tok):
    lengths = [len(_prompt(tok, t)) for t in TEXTS]
    shuffled = [b["index"].tolist() for b in P.sentiment_batches(tok, TEXTS, LABELS, 3, shuffle=True, seed=1)]
    assert shuffled == length_grouped_batches(lengths, 3, seed=1)
    assert sorted(i for b in shuffled for i in b) == list(range(len(TEXTS)))
    assert shuffled != [b["index"].tolist() for b in P.sentiment_batches(tok, TEXTS, LABELS, 3, shuffle=True, seed=2)]


# ----------------------------------------------------------------------------- reading the answer
def test_batched_logits_equal_one_prompt_at_a_time(tok):
    model = tiny_causal_lm(seed=3)
    batched = P.sentiment_logits(model, tok, TEXTS, batch_size=5)  # two batches, padded rows, shared prefix
    full = _full_forward_answers(model, tok, TEXTS)[:, P.label_token_ids(tok)]
    assert batched.shape == (len(TEXTS), 2)
    torch.testing.assert_close(batched, full, atol=1e-5, rtol=1e-5)
    single = torch.cat([P.sentiment_logits(model, tok, [t], batch_size=1) for t in TEXTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_accuracy_is_the_argmax_of_label_logits(tok):
    model = tiny_causal_lm(seed=3)
    preds = _full_forward_answers(model, tok, TEXTS)[:, P.label_token_ids(tok)].argmax(-1)
    split = Split(TEXTS, LABELS)
    want = (preds == torch.tensor(LABELS)).float().mean().item()
    assert P.sentiment_accuracy(model, tok, split, batch_size=3) == pytest.approx(want)
    want5 = (preds[:5] == torch.tensor(LABELS[:5])).float().mean().item()
    assert P.sentiment_accuracy(model, tok, split, limit=5) == pytest.approx(want5)


def test_the_loss_trains_the_token_the_accuracy_reads(tok):
    """answer_loss is the cross-entropy of the right label word at the prompt's last token: the
    next-token loss of prompt + label word, on the very logits sentiment_logits compares."""
    model = tiny_causal_lm(seed=5)
    batches = P.sentiment_batches(tok, TEXTS, LABELS, batch_size=3, shuffle=True)
    label_ids = P.label_token_ids(tok)
    with torch.no_grad():
        losses = [(P.answer_loss(model, b), len(b["index"])) for b in batches]
        full = _full_forward_answers(model, tok, TEXTS)
        with_answer = [_prompt(tok, t) + [label_ids[y]] for t, y in zip(TEXTS, LABELS)]
        lm = torch.stack([F.cross_entropy(model(torch.tensor([r])).logits[0, -2], torch.tensor(r[-1]))
                          for r in with_answer])
    mean = sum(loss * n for loss, n in losses) / len(TEXTS)
    targets = torch.tensor([label_ids[y] for y in LABELS])
    torch.testing.assert_close(mean, F.cross_entropy(full, targets), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, lm.mean(), atol=1e-5, rtol=1e-5)


def test_the_one_loop_teaches_the_answer(tok):
    model = tiny_causal_lm(seed=0)
    batches = P.sentiment_batches(tok, TEXTS, LABELS, batch_size=8, shuffle=True)
    split = Split(TEXTS, LABELS)
    run = train(model, batches * 32, P.answer_loss, lr=1e-2, decay=False, clip=None)  # lab 5's settings
    assert len(run.losses) == 32 and run.losses[-1] < 0.05 * run.losses[0]
    assert P.sentiment_accuracy(model, tok, split) == 1.0 and not model.training


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_zero_shot_smollm2_beats_chance():
    prepare_causal_lm(verbose=False)  # a no-op once `make setup` has run
    model, tok = load_causal_lm()
    acc = P.sentiment_accuracy(model, tok, load_sentiment_data("movies").test, limit=200)
    assert 0.6 < acc < 0.85  # 0.725 when measured (README); a broken prompt answers ~0.5
