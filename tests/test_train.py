"""qcore.train: the one loop learns, follows its schedule, repeats; the one evaluation has one order."""
import copy
import sys
import types

import pytest
import torch

from qcore import train
from qcore.zoo.sentiment import Split, load_tokenizer, tiny_sentiment_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _toy_split(n=64):
    words = [("great", 1), ("awful", 0), ("lovely", 1), ("boring", 0)]
    texts = [f"a {w} film number {i}" for i in range(n // 4) for w, _ in words]
    labels = [l for _ in range(n // 4) for _, l in words]
    return Split(texts, labels)


def _toy_batches(tok, split, **kw):
    return train.classifier_batches(tok, split.texts, split.labels, shuffle=True, **kw)


@pytest.fixture
def recorded_steps(monkeypatch):
    """Each optimizer step's learning rate and gradient norm, as the loop hands them to AdamW."""
    steps = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            steps.append((self.param_groups[0]["lr"], torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])).item()))
            return super().step(closure)

    monkeypatch.setattr(train.torch.optim, "AdamW", RecordingAdamW)
    return steps


def _regression(n_steps, scale=1.0):
    """A linear model, ``n_steps`` copies of one batch and its MSE loss (targets ``scale`` times off)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batch = (torch.randn(8, 3), scale * torch.randn(8, 1))
    return model, [batch] * n_steps, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])


# ----------------------------------------------------------------------------- the loop
def test_classifier_loop_learns_a_separable_toy_task():
    model, tok = tiny_sentiment_model(), load_tokenizer()
    split = _toy_split()
    before = train.evaluate_classifier(model, tok, split)
    run = train.train(model, _toy_batches(tok, split, batch_size=16, epochs=20), train.classifier_loss,
                      lr=2e-3, warmup=0.1)
    after = train.evaluate_classifier(model, tok, split)
    assert len(run.losses) == len(run.seconds) == 80 and all(s > 0 for s in run.seconds)
    assert sum(run.losses[-4:]) / 4 < sum(run.losses[:4]) / 4
    assert after >= 0.9 and after > before
    assert not model.training  # left ready for evaluation


def test_training_is_repeatable_with_a_seed():
    tok, split = load_tokenizer(), _toy_split(32)
    runs = []
    for _ in range(2):
        model = tiny_sentiment_model(seed=1)  # DistilBERT's dropout draws from the seeded generator
        runs.append(train.train(model, _toy_batches(tok, split, batch_size=8, seed=3), train.classifier_loss,
                                lr=1e-3, seed=3).losses)
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_schedule_warms_up_then_decays_linearly(recorded_steps):
    model, batches, mse = _regression(10)
    train.train(model, batches, mse, lr=1.0, warmup=0.2)  # 2 warm-up steps of 10
    lrs = [lr for lr, _ in recorded_steps]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])


def test_schedule_without_warmup_or_decay(recorded_steps):
    model, batches, mse = _regression(4)
    train.train(model, batches, mse, lr=0.1)
    train.train(model, batches, mse, lr=0.1, decay=False)
    assert [lr for lr, _ in recorded_steps] == pytest.approx([0.1, 0.075, 0.05, 0.025] + [0.1] * 4)


def test_gradients_are_clipped_unless_told_not_to(recorded_steps):
    model, batches, mse = _regression(1, scale=100.0)  # a large loss: gradient norm in the hundreds
    unclipped = copy.deepcopy(model)
    train.train(model, batches, mse, lr=0.1, clip=1.0)
    train.train(unclipped, batches, mse, lr=0.1, clip=None)
    (_, clipped_norm), (_, raw_norm) = recorded_steps
    assert clipped_norm == pytest.approx(1.0, rel=1e-4) and raw_norm > 10


def test_on_step_runs_before_each_step_in_training_mode():
    model, batches, mse = _regression(5)
    seen = []
    run = train.train(model, batches, mse, lr=0.1, on_step=lambda s: seen.append((s, model.training)))
    assert seen == [(s, True) for s in range(5)] and len(run.losses) == 5


def test_only_parameters_that_require_grad_move():
    model, batches, mse = _regression(3)
    model.bias.requires_grad_(False)
    bias, weight = model.bias.detach().clone(), model.weight.detach().clone()
    train.train(model, batches, mse, lr=0.1)
    assert torch.equal(model.bias, bias) and not torch.equal(model.weight, weight)


def _weights_after_small_steps(weights: torch.dtype, autocast):
    """A weight of 1.0 after 20 AdamW steps of lr 1e-4 (each moves it by about 1e-4)."""
    model = torch.nn.Linear(4, 1, bias=False).to(weights)
    with torch.no_grad():
        model.weight.fill_(1.0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    batches = [(x.to(weights), torch.zeros(16, 1))] * 20
    mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]).float(), b[1])
    run = train.train(model, batches, mse, lr=1e-4, decay=False, clip=None, desc="", autocast=autocast)
    return model.weight.detach(), run


def test_mixed_precision_keeps_the_updates_that_bf16_weights_lose():
    """Adam's step is about lr = 1e-4 per weight; half a BF16 step at 1.0 is 2**-8 / 2 ~ 2e-3, so
    pure-BF16 weights never move, while FP32 master weights under BF16 autocast move like FP32."""
    pure, _ = _weights_after_small_steps(torch.bfloat16, None)
    master, run = _weights_after_small_steps(torch.float32, torch.bfloat16)
    fp32, _ = _weights_after_small_steps(torch.float32, None)
    assert torch.equal(pure, torch.ones_like(pure))
    assert master.dtype == torch.float32 and len(run.losses) == 20
    moved, want = 1 - master, 1 - fp32                      # 20 steps of about 1e-4
    assert ((moved > 1.5e-3) & (moved < 2.5e-3)).all()
    torch.testing.assert_close(moved, want, rtol=0.05, atol=0)  # BF16 products: the same steps within a few %


def test_fp16_autocast_scales_the_loss_and_skips_overflowing_steps():
    """With fp16 the loss is scaled (GradScaler, initial scale 2**16): a step whose scaled gradient
    overflows is skipped, the scale halves, and training goes on; the weights stay FP32."""
    master, run = _weights_after_small_steps(torch.float32, torch.float16)
    assert master.dtype == torch.float32 and len(run.losses) == 20
    assert ((1 - master > 1e-3) & (1 - master < 2.5e-3)).all()


def test_without_autocast_the_loop_is_the_plain_one():
    """The default changes nothing: the same weights as AdamW stepped by hand."""
    model, batches, mse = _regression(3)
    twin = copy.deepcopy(model)
    train.train(model, batches, mse, lr=0.1, decay=False, clip=None, desc="")
    opt = torch.optim.AdamW(twin.parameters(), lr=0.1, weight_decay=0.0)
    for b in batches:
        mse(twin, b).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- batches
def test_length_grouped_batches_cover_everything_once():
    lengths = [len(t) for t in _toy_split(200).texts]
    batches = train.length_grouped_batches(lengths, 16, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200)) and max(len(b) for b in batches) == 16
    assert batches == train.length_grouped_batches(lengths, 16, seed=0) != train.length_grouped_batches(lengths, 16, 1)


def test_classifier_batches_evaluation_and_training_orders():
    tok, split = load_tokenizer(), _toy_split(40)
    evaluation = train.classifier_batches(tok, split.texts, split.labels, batch_size=8)
    order = [i for b in evaluation for i in b["index"].tolist()]
    assert order == sorted(range(40), key=lambda i: len(split.texts[i]))  # sorted by length, stable
    for b in evaluation:
        assert b["labels"].tolist() == [split.labels[i] for i in b["index"].tolist()]
        assert b["input_ids"].shape == b["attention_mask"].shape and b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]
    two = _toy_batches(tok, split, batch_size=8, epochs=2)
    assert sorted(i for b in two for i in b["index"].tolist()) == sorted(list(range(40)) * 2)
    short = _toy_batches(tok, split, batch_size=8, epochs=2, steps=3)
    assert [b["index"].tolist() for b in short] == [b["index"].tolist() for b in two[:3]]
    assert "labels" not in train.classifier_batches(tok, split.texts)[0]


# ----------------------------------------------------------------------------- the evaluation
def test_classifier_logits_are_in_the_texts_order():
    model, tok = tiny_sentiment_model(seed=2), load_tokenizer()
    texts = _toy_split(24).texts[::-1]
    together = train.classifier_logits(model, train.classifier_batches(tok, texts, batch_size=5), desc=None)
    alone = torch.cat([model(**tok([t], return_tensors="pt")).logits.detach() for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


class _BatchDependent(torch.nn.Module):
    """Answers 1 for every sentence of a batch whose padded width is even: torch.ao's dynamic int8
    (one activation scale per padded batch) in the extreme."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # where the model lives

    def forward(self, input_ids, attention_mask):
        even = float(input_ids.shape[1] % 2 == 0)
        return types.SimpleNamespace(logits=torch.tensor([[1 - even, even]]).repeat(len(input_ids), 1))


def test_one_accuracy_for_a_batch_dependent_model():
    """Which sentences share a batch changes such a model's answers: evaluate_classifier (the
    benchmarks) and classifier_logits over classifier_batches (the labs) use the one order."""
    tok, model = load_tokenizer(), _BatchDependent()
    texts = [f"{'very ' * (i % 5)}good film" for i in range(20)]  # 4 to 8 tokens, mixed
    split = Split(texts, [1] * 20)
    logits = train.classifier_logits(model, train.classifier_batches(tok, texts, batch_size=4), desc=None)
    labs = (logits.argmax(-1) == 1).float().mean().item()
    in_file_order = torch.cat([train.classifier_logits(model, train.classifier_batches(tok, texts[i:i + 4]), desc=None)
                               for i in range(0, 20, 4)])
    assert train.evaluate_classifier(model, tok, split, batch_size=4) == labs
    assert (in_file_order.argmax(-1) == 1).float().mean().item() != labs  # the order matters here


# ----------------------------------------------------------------------------- quiet, device
def test_progress_is_silent_under_nbgrader(monkeypatch, capsys):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # even where someone watches
    assert list(train.progress(range(5), desc="x")) == list(range(5))
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_progress_draws_on_stdout_only_where_watched(monkeypatch, capsys):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    list(train.progress(range(3), desc="in a log"))
    list(train.progress(range(3), desc="asked for", disable=False))
    assert capsys.readouterr() == ("", "")  # a pipe or a CI log: no bar, even when asked for
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal
    list(train.progress(range(3), desc="visible"))
    out = capsys.readouterr()
    assert "visible" in out.out and out.err == ""


def test_progress_tells_a_kernel_from_an_imported_ipykernel(monkeypatch, capsys):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    import ipykernel  # noqa: F401  (imported, as other tests of a run do, but no kernel runs)

    list(train.progress(range(3), desc="imported only"))
    assert capsys.readouterr() == ("", "")
    ZMQInteractiveShell = type("ZMQInteractiveShell", (), {})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=ZMQInteractiveShell))
    list(train.progress(range(3), desc="in a kernel"))
    assert "in a kernel" in capsys.readouterr().out


def test_device_policy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.pick_device() == "cpu" and train.compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.pick_device() == "cuda"
    # torch's answer: True where bf16 is native (Ampere and newer) and, unless told not to count
    # emulation, also on a T4 (which emulates it, slowly)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert train.compute_dtype("cuda") == train.compute_dtype("cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train.compute_dtype("cuda") == torch.float16  # a T4: emulated bf16 does not count
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # older
    assert train.compute_dtype("cuda") == torch.float16
