"""qcore.zoo.causal_lm: SmolLM2 from the GGUF package, its cache, and where a prompt's answer is read.

Fast tests use a random 2-layer Llama with SmolLM2's vocabulary and the real tokenizer (the
cached one, or the one inside the GGUF). Slow tests load the real 135M-parameter model; how fast
it loads is measured by bench/bench_causal_lm.py, not asserted here.
"""
import pytest
import torch

from qcore import assets
from qcore.zoo import causal_lm as C

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return C.load_causal_lm_tokenizer()


def test_tokenizer_padding(tok):
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.padding_side == "right"
    assert len(tok) == C.tiny_causal_lm().config.vocab_size == 49152


def test_tiny_model_is_seeded():
    a, b, c = C.tiny_causal_lm(0), C.tiny_causal_lm(0), C.tiny_causal_lm(1)
    x = torch.tensor([[1, 42, 7]])
    assert torch.equal(a(x).logits, b(x).logits) and not torch.equal(a(x).logits, c(x).logits)
    assert a.config.num_hidden_layers == 2 and a.lm_head.weight is a.model.embed_tokens.weight


def test_answer_logits_read_each_rows_last_real_token():
    """Right-padded rows of different lengths, with and without a cached shared prefix, give each
    row's own next-token logits (those of a full forward pass over that row alone)."""
    model = C.tiny_causal_lm(seed=3)
    rows = [[1, 5, 9, 4, 8, 2], [1, 5, 9, 7], [1, 5, 9, 3, 3]]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([row])).logits[0, -1] for row in rows])
        got = C.answer_logits(model, ids, mask)
        cached = C.answer_logits(model, ids[:, 3:], mask[:, 3:], C.prefix_cache(model, ids[0, :3]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, want, atol=1e-5, rtol=1e-5)


def test_under_the_grader_a_missing_cache_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")  # a graded run prepares nothing
    for make in (C.load_causal_lm, C.load_causal_lm_tokenizer, lambda: C.prepare_causal_lm(verbose=False)):
        with pytest.raises(assets.AssetError, match=r"Run: make setup +\(or: python -m qcore\.zoo prepare\)"):
            make()  # the tokenizer: no cache and no GGUF either
    assert not (tmp_path / "models").exists() and not (tmp_path / "downloads").exists()
    assert C.causal_lm_dir() == tmp_path / "models" / "smollm2-135m-instruct"


def test_elsewhere_the_first_load_prepares_the_model_with_prepare_causal_lm(tok, stand_in_prepare):
    """The wiring, with a stand-in for the real preparation (a download and a 20 s conversion: the
    fresh-user test in tests/test_packaging.py runs the real one)."""
    calls = stand_in_prepare(C, "prepare_causal_lm", C.MODEL_DIR_NAME, C.tiny_causal_lm(), tok)
    model, _ = C.load_causal_lm()
    assert calls == [1] and model.config.num_hidden_layers == 2
    C.load_causal_lm()
    assert calls == [1]  # prepared once


def test_a_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    from qcore.zoo import prepared

    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="disk full"):
        with prepared.writing("m", {"a": 1}) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert not (tmp_path / "models" / "m").exists() and not (tmp_path / "models" / "m.partial").exists()
    with prepared.writing("m", {"a": 2}) as tmp:
        (tmp / "weights").write_text("whole")
    assert prepared.read_meta("m") == {"a": 2} and prepared.prepared_dir("m", "m") == tmp_path / "models" / "m"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def prepared():
    return C.prepare_causal_lm(verbose=False)  # a no-op once `make setup` has run


@pytest.mark.slow
def test_prepare_is_idempotent(prepared, capsys):
    assert C.prepare_causal_lm() == prepared == C.causal_lm_dir()
    assert "ok" in capsys.readouterr().out
    assert (prepared / "model.safetensors").is_file()
    assert not prepared.with_name(prepared.name + ".partial").exists()


@pytest.mark.slow
def test_prepared_models_equal_the_gguf_model(prepared, tmp_path, monkeypatch, capsys):
    """A fresh prepare (into an empty cache) and the cached model both compute the GGUF's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcore.zoo.prompted_sentiment import sentiment_prompt

    cached, tok = C.load_causal_lm()
    assert next(cached.parameters()).dtype == torch.float32 and not cached.training
    gguf = C.gguf_path()
    with C._quiet_loading():
        ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                   dtype=torch.float32).eval()
        ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    (tmp_path / "smollm2").symlink_to(assets.cache_dir() / "smollm2")
    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path))
    out = C.prepare_causal_lm(verbose=False)
    assert out == tmp_path / "models" / "smollm2-135m-instruct"
    files = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "qcourse.json"} <= files
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no .partial left behind
    fresh, fresh_tok = C.load_causal_lm()

    prompt = sentiment_prompt("An engrossing, beautifully shot film.", tok)
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
