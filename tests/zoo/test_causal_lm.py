"""qcore.zoo.causal_lm: SmolLM2 from the GGUF package, sentiment prompts, zero-shot and LM batches.

Fast tests use a random 2-layer Llama with SmolLM2's vocabulary and the real tokenizer (the
cached one, or the one inside the GGUF). Slow tests load the real 135M-parameter model.
"""
import time

import pytest
import torch

from qcore import assets
from qcore.train import evaluate_causal_lm, lm_loss, train_causal_lm
from qcore.zoo import causal_lm as C
from qcore.zoo.sentiment import Split, load_sentiment_data

TEXTS = ["Great fun.", "A dull, plodding and utterly forgettable mess of a film.",
         "The cast is superb.", "Nothing works.", "It's a charming, funny, warm-hearted little movie.",
         "  Too long.  ", "An ambitious failure that never finds its footing or its heart.", "Loved it!"]
LABELS = [1, 0, 1, 0, 1, 0, 0, 1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return C.load_causal_lm_tokenizer()


@pytest.fixture(scope="module")
def split():
    return Split(TEXTS, LABELS)


# ----------------------------------------------------------------------------- tokenizer and prompt
def test_tokenizer_padding(tok):
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.padding_side == "right"
    assert len(tok) == C.tiny_causal_lm().config.vocab_size == 49152


def test_prompt_is_chat_and_ends_before_the_label(tok):
    p = C.sentiment_prompt("  Great fun. ", tok)
    assert p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n" + C.ANSWER_PREFIX)
    assert "Sentence: Great fun.<|im_end|>" in p
    ids = tok(p, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


@pytest.mark.parametrize("text", TEXTS)
def test_label_words_are_single_tokens_after_the_prompt(tok, text):
    """Tokenizing prompt + word in one go gives the prompt's tokens plus exactly one more."""
    label_ids = C.label_token_ids(tok)
    assert len(set(label_ids)) == 2
    prompt = C.sentiment_prompt(text, tok)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    for word, wid in zip(C.LABEL_WORDS, label_ids):
        assert tok(prompt + word, add_special_tokens=False).input_ids == prompt_ids + [wid]
    assert tok.decode(label_ids) == "".join(C.LABEL_WORDS)


# ----------------------------------------------------------------------------- training batches
def test_lm_batches_shapes_and_masking(tok, split):
    got = C.sentiment_lm_batches(tok, split, batch_size=3, limit=7)
    assert [b["input_ids"].shape[0] for b in got] == [3, 3, 1]
    label_ids = C.label_token_ids(tok)
    for k, b in enumerate(got):
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.dtype == labels.dtype == torch.long
        assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == tok.pad_token_id).all()
        assert mask.sum(1).max() == ids.shape[1]  # no column of padding only
        for r in range(ids.shape[0]):
            i = 3 * k + r
            n = int(mask[r].sum())
            assert mask[r, :n].all() and not mask[r, n:].any()  # right padding
            prompt = tok(C.sentiment_prompt(TEXTS[i], tok), add_special_tokens=False).input_ids
            assert ids[r, :len(prompt)].tolist() == prompt and n == len(prompt) + 1
            assert (labels[r, :len(prompt)] == -100).all()  # no loss on the prompt
            assert labels[r, n - 1] == ids[r, n - 1] == label_ids[LABELS[i]]  # loss on the answer only
            assert int((labels[r] != -100).sum()) == 1


def test_lm_batches_eos_shuffle_and_device(tok, split):
    b = C.sentiment_lm_batches(tok, split, batch_size=8, add_eos=True)[0]
    kept = [[t for t in row if t != -100] for row in b["labels"].tolist()]
    assert kept == [[C.label_token_ids(tok)[y], tok.eos_token_id] for y in LABELS]
    def decoded(bs):
        return [tok.decode(row[row != tok.pad_token_id]) for b in bs for row in b["input_ids"]]

    plain = decoded(C.sentiment_lm_batches(tok, split, batch_size=3))
    mixed = decoded(C.sentiment_lm_batches(tok, split, batch_size=3, shuffle=True, seed=1))
    assert mixed == decoded(C.sentiment_lm_batches(tok, split, batch_size=3, shuffle=True, seed=1))
    assert sorted(mixed) == sorted(plain) and mixed != plain
    assert b["labels"].device.type == "cpu"


# ----------------------------------------------------------------------------- zero-shot
def test_tiny_model_is_seeded():
    a, b, c = C.tiny_causal_lm(0), C.tiny_causal_lm(0), C.tiny_causal_lm(1)
    x = torch.tensor([[1, 42, 7]])
    assert torch.equal(a(x).logits, b(x).logits) and not torch.equal(a(x).logits, c(x).logits)
    assert a.config.num_hidden_layers == 2 and a.lm_head.weight is a.model.embed_tokens.weight


def test_batched_zero_shot_equals_one_by_one(tok):
    model = C.tiny_causal_lm(seed=3)
    batched = C.sentiment_logits(model, tok, TEXTS, batch_size=5)  # two batches, padded rows
    single = torch.cat([C.sentiment_logits(model, tok, [t], batch_size=1) for t in TEXTS])
    assert batched.shape == (len(TEXTS), 2)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched.argmax(-1), single.argmax(-1))


def test_zero_shot_accuracy_is_the_argmax_of_label_logits(tok, split):
    model = C.tiny_causal_lm(seed=3)
    preds = C.sentiment_logits(model, tok, TEXTS).argmax(-1)
    want = (preds == torch.tensor(LABELS)).float().mean().item()
    assert C.zero_shot_sentiment(model, tok, split, batch_size=3) == pytest.approx(want)
    want5 = (preds[:5] == torch.tensor(LABELS[:5])).float().mean().item()
    assert C.zero_shot_sentiment(model, tok, split, limit=5) == pytest.approx(want5)


def test_training_reads_the_position_zero_shot_reads(tok, split):
    """The LM loss of a batch is the cross-entropy of the next-token logits zero-shot uses."""
    model = C.tiny_causal_lm(seed=5)
    b = C.sentiment_lm_batches(tok, split, batch_size=8)[0]
    loss = lm_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
    with torch.no_grad():
        lengths = [len(tok(C.sentiment_prompt(t, tok), add_special_tokens=False).input_ids) for t in TEXTS]
        full = torch.stack([model(**tok(C.sentiment_prompt(t, tok), add_special_tokens=False,
                                        return_tensors="pt")).logits[0, n - 1]
                            for t, n in zip(TEXTS, lengths)])  # [8, vocab]
    targets = torch.tensor([C.label_token_ids(tok)[y] for y in LABELS])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(full, targets), atol=1e-5, rtol=1e-5)
    two = C.sentiment_logits(model, tok, TEXTS)
    torch.testing.assert_close(two, full[:, C.label_token_ids(tok)], atol=1e-5, rtol=1e-5)


def test_a_few_training_steps_reduce_the_loss(tok, split):
    model = C.tiny_causal_lm(seed=0)
    fixed = C.sentiment_lm_batches(tok, split, batch_size=8)
    before, _ = evaluate_causal_lm(model, fixed)
    losses = train_causal_lm(model, fixed * 8, lr=1e-2)
    after, ppl = evaluate_causal_lm(model, fixed)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert after < 0.5 * before and ppl == pytest.approx(torch.tensor(after).exp().item())


def test_answer_batches_train_the_token_zero_shot_reads(tok, split):
    """sentiment_train_batches + answer_logits: every sentence once, its label word as target, and
    the cross-entropy equal to the LM loss of sentiment_lm_batches on the same sentences."""
    model = C.tiny_causal_lm(seed=5)
    batches = C.sentiment_train_batches(tok, split, batch_size=3, seed=1)
    assert [b["input_ids"].shape[0] for b in batches] in ([3, 3, 2], [3, 2, 3], [2, 3, 3])
    ids = C.label_token_ids(tok)
    assert sorted(sum((b["targets"].tolist() for b in batches), [])) == sorted(ids[y] for y in LABELS)
    with torch.no_grad():
        answer = torch.cat([C.answer_logits(model, b["input_ids"], b["attention_mask"]) for b in batches])
        targets = torch.cat([b["targets"] for b in batches])
        lm = C.sentiment_lm_batches(tok, split, batch_size=8)[0]
        want = lm_loss(model, lm["input_ids"], lm["attention_mask"], lm["labels"])
    assert answer.shape == (len(TEXTS), 49152)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(answer, targets), want, atol=1e-5, rtol=1e-5)
    two = C.sentiment_logits(model, tok, TEXTS)  # the same logits zero-shot compares
    assert torch.allclose(torch.sort(answer[:, ids].flatten()).values, torch.sort(two.flatten()).values, atol=1e-5)
    assert C.sentiment_train_batches(tok, split, batch_size=3, limit=4)[0]["input_ids"].shape[0] <= 3


def test_missing_cache_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetError, match="make setup"):
        C.load_causal_lm()
    with pytest.raises(assets.AssetError, match="make setup"):
        C.load_causal_lm_tokenizer()  # no cache and no GGUF either
    with pytest.raises(assets.AssetError, match="make setup"):
        C.prepare_causal_lm(verbose=False)
    assert not (tmp_path / "models").exists()
    assert C.causal_lm_dir() == tmp_path / "models" / "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def prepared():
    return C.prepare_causal_lm(verbose=False)  # a no-op once `make setup` has run


@pytest.mark.slow
def test_prepare_is_idempotent(prepared, capsys):
    t = time.perf_counter()
    assert C.prepare_causal_lm() == prepared == C.causal_lm_dir()
    assert time.perf_counter() - t < 5 and "ok" in capsys.readouterr().out
    assert (prepared / "model.safetensors").is_file()
    assert not prepared.with_name(prepared.name + ".partial").exists()


@pytest.mark.slow
def test_prepared_models_equal_the_gguf_model(prepared, tmp_path, monkeypatch, capsys):
    """A fresh prepare (into an empty cache) and the cached model both compute the GGUF's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached, tok = C.load_causal_lm()
    gguf = C.gguf_path()
    t = time.perf_counter()
    with C._quiet_loading():
        ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                   dtype=torch.float32).eval()
        ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t_gguf = time.perf_counter() - t

    (tmp_path / "smollm2").symlink_to(assets.cache_dir() / "smollm2")
    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path))
    t = time.perf_counter()
    out = C.prepare_causal_lm(verbose=False)
    t_prepare = time.perf_counter() - t
    assert out == tmp_path / "models" / "smollm2-135m-instruct"
    files = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "qcourse.json"} <= files
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no .partial left behind
    t = time.perf_counter()
    fresh, fresh_tok = C.load_causal_lm()
    t_cache = time.perf_counter() - t

    prompt = C.sentiment_prompt("An engrossing, beautifully shot film.", tok)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    assert ids.input_ids[0].tolist() == ref_tok(prompt, add_special_tokens=False).input_ids \
        == fresh_tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        want = ref(**ids).logits
        torch.testing.assert_close(cached(**ids).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(fresh(**ids).logits, want, atol=1e-4, rtol=0)
    assert fresh.num_parameters() == ref.num_parameters() == 134_515_008
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # tied, as in SmolLM2
    assert capsys.readouterr().err == ""  # quiet: nbgrader fails cells that write to stderr
    with capsys.disabled():
        print(f"\nload: GGUF {t_gguf:.1f} s, prepare {t_prepare:.1f} s, fp32 cache {t_cache:.1f} s")


@pytest.mark.slow
def test_second_load_of_the_cache_is_fast(prepared, capsys):
    C.load_causal_lm()
    t = time.perf_counter()
    model, tok = C.load_causal_lm()
    seconds = time.perf_counter() - t
    with capsys.disabled():
        print(f"\nsecond load of the cached SmolLM2: {seconds:.2f} s")
    assert seconds < 10
    assert next(model.parameters()).dtype == torch.float32 and not model.training


@pytest.mark.slow
def test_zero_shot_smollm2_beats_chance(prepared, capsys):
    model, tok = C.load_causal_lm()
    test = load_sentiment_data("movies").test
    t = time.perf_counter()
    acc = C.zero_shot_sentiment(model, tok, test, limit=200)
    with capsys.disabled():
        print(f"\nzero-shot SmolLM2 on 200 movie test sentences: accuracy {acc:.3f} "
              f"({time.perf_counter() - t:.1f} s)")
    assert acc > 0.5
