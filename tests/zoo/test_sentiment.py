"""qcore.zoo sentiment data and model: label rule, fixed splits, exact weight mapping, accuracy."""
import pytest
import torch

from qcore import assets
from qcore.zoo import sentiment as zs


def test_splits_are_fixed_disjoint_and_follow_the_label_rule():
    a, b = zs.load_sentiment_data("movies"), zs.load_sentiment_data("movies")
    assert a.train.texts[:5] == b.train.texts[:5] and a.test.labels == b.test.labels
    sizes = len(a.train), len(a.validation), len(a.test)
    kept = [(t, r) for t, r in zs.read_ratings("movies") if abs(r) >= zs.MIN_ABS_RATING]
    assert sum(sizes) == len(kept) and 10_000 < len(zs.read_ratings("movies")) < 11_000
    assert abs(sizes[0] / sum(sizes) - 0.8) < 0.01
    rating = dict(kept)
    for split in (a.train, a.validation, a.test):
        assert all(label == int(rating[t] > 0) for t, label in zip(split.texts, split.labels))
    assert not set(a.train.texts[:500]) & set(a.test.texts)
    assert 0.4 < sum(a.test.labels) / len(a.test) < 0.6
    assert zs.load_sentiment_data("movies", seed=1).test.texts != a.test.texts


@pytest.mark.parametrize("domain", ["tweets", "amazon", "nyt"])
def test_other_domains_load(domain):
    data = zs.load_sentiment_data(domain)
    assert len(data.train) > 1000 and set(data.test.labels) == {0, 1}


def test_unknown_domain_names_the_known_ones():
    with pytest.raises(ValueError, match="movies"):
        zs.load_sentiment_data("imdb")


def test_minilm_in_distilbert_equals_the_original_bert():
    bert, distil = zs.load_minilm_bert(), zs.distilbert_from_minilm()
    tok = zs.load_tokenizer()
    data = zs.load_sentiment_data("movies")
    enc = tok(data.test.texts[:16], padding=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        want = bert(**enc).last_hidden_state
        got = distil.distilbert(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_tiny_model_runs():
    model, tok = zs.tiny_sentiment_model(), zs.load_tokenizer()
    logits = model(**tok(["fine", "not fine at all"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2)


def test_under_the_grader_a_missing_model_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")  # a graded run prepares nothing
    with pytest.raises(assets.AssetError, match="make setup"):
        zs.load_sentiment_model()
    assert not any(tmp_path.iterdir())


def test_elsewhere_the_first_load_fine_tunes_with_prepare_sentiment_model(stand_in_prepare):
    """The wiring, with a stand-in for the real fine-tune (minutes: the fresh-user test in
    tests/test_packaging.py runs the real one)."""
    tok = zs.load_tokenizer()  # from the real cache, before the fixture empties it
    calls = stand_in_prepare(zs, "prepare_sentiment_model", zs.MODEL_DIR_NAME, zs.tiny_sentiment_model(), tok)
    model, _ = zs.load_sentiment_model()
    assert calls == [1] and model.config.n_layers == 2
    zs.load_sentiment_model()
    assert calls == [1]  # prepared once


@pytest.mark.slow
def test_cached_model_reaches_the_accuracy_target():
    from qcore.train import evaluate_classifier

    model, tok = zs.load_sentiment_model()
    acc = evaluate_classifier(model, tok, zs.load_sentiment_data("movies").test)
    print(f"movies test accuracy {acc:.4f}")
    assert acc >= 0.82


def test_lab_classifier_falls_back_to_the_hub_by_itself_and_says_so(monkeypatch, capsys):
    asked = []

    def load(name=None, device="cpu"):
        asked.append(name)
        if name is None:
            raise assets.AssetError("the fine-tuned sentiment model is not prepared. Run: make setup")
        return "hub model", "hub tokenizer"

    monkeypatch.setattr(zs, "load_sentiment_model", load)
    monkeypatch.setattr(zs, "load_sentiment_data", lambda domain: f"{domain} data")
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    assert zs.load_lab_classifier() == ("hub model", "hub tokenizer", "sst2 data")
    assert asked == [None, zs.HUB_SENTIMENT_MODEL] and "from the hub instead" in capsys.readouterr().out
    assert zs.load_lab_classifier(use_hub=True)[2] == "sst2 data" and asked[-1] == zs.HUB_SENTIMENT_MODEL
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")  # grading never goes online
    with pytest.raises(assets.AssetError, match="make setup"):
        zs.load_lab_classifier()


def test_lab_classifier_is_the_offline_one_where_it_is_prepared():
    model, tok, data = zs.load_lab_classifier()
    assert model.config.dim == 384 and data.test.texts == zs.load_sentiment_data("movies").test.texts
