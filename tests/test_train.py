"""qcore.train: loops that learn, evaluate honestly, and stay quiet under nbgrader."""
import torch

from qcore import train
from qcore.zoo.sentiment import Split, load_tokenizer, tiny_sentiment_model


def _toy_split(n=64):
    words = [("great", 1), ("awful", 0), ("lovely", 1), ("boring", 0)]
    texts = [f"a {w} film number {i}" for i in range(n // 4) for w, _ in words]
    labels = [l for _ in range(n // 4) for _, l in words]
    return Split(texts, labels)


def test_classifier_loop_learns_a_separable_toy_task():
    torch.manual_seed(0)
    model, tok = tiny_sentiment_model(), load_tokenizer()
    split = _toy_split()
    before = train.evaluate_classifier(model, tok, split)
    losses = train.train_classifier(model, tok, split, epochs=20, lr=2e-3, batch_size=16)
    after = train.evaluate_classifier(model, tok, split)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert after >= 0.9 and after > before


def test_training_is_repeatable_with_a_seed():
    tok, split = load_tokenizer(), _toy_split(32)
    runs = []
    for _ in range(2):
        model = tiny_sentiment_model(seed=1)
        runs.append(train.train_classifier(model, tok, split, epochs=1, batch_size=8, seed=3))
    assert runs[0] == runs[1]


def test_progress_is_silent_under_nbgrader(monkeypatch, capsys):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert list(train.progress(range(5), desc="x")) == list(range(5))
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_progress_never_writes_to_stderr(monkeypatch, capsys):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    list(train.progress(range(3), desc="visible"))
    assert capsys.readouterr().err == ""


def test_length_grouped_batches_cover_everything_once():
    lengths = [len(t) for t in _toy_split(200).texts]
    batches = train.length_grouped_batches(lengths, 16, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200)) and max(len(b) for b in batches) == 16


def test_device_policy_on_this_machine():
    device = train.pick_device()
    assert train.compute_dtype("cpu") == torch.float32
    if device == "cuda":
        assert train.compute_dtype("cuda") in (torch.bfloat16, torch.float16)
