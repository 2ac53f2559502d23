"""Sentiment as next-token prediction: the prompt, its batches, its loss and its accuracy (lab 5).

The chat prompt of ``sentiment_prompt`` asks whether a movie sentence is positive or negative
and ends with the assistant's "Sentiment:", so the next token is the answer: the larger of the
model's logits for the two ``LABEL_WORDS`` is the prediction (zero-shot or after fine-tuning).
Training (lab 5, LoRA) teaches exactly that token: ``answer_loss`` is the cross-entropy of the
right label word there, on the batches of ``sentiment_batches``, the same batches (in the
evaluation order) that ``sentiment_logits`` reads. Both read the answer with
``qcore.zoo.causal_lm.answer_logits``.

A 135M model is very sensitive to the wording: the prompt here was picked among a handful on
the validation split (about 0.73 accurate there); asking "negative or positive?" instead, or
prefilling "Answer:", makes it answer "negative" almost every time (about 0.5).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from qcore.train import length_grouped_batches, length_sorted_batches, progress
from qcore.zoo.causal_lm import answer_logits, prefix_cache

# Index = label (0 negative, 1 positive). The leading space matters: after "Sentiment:" each
# word is one token of SmolLM2's BPE vocabulary (" negative" 3524, " positive" 2731).
LABEL_WORDS = (" negative", " positive")
QUESTION = ("Is the sentiment of this sentence from a movie review positive or negative?\n\n"
            "Sentence: {text}")
ANSWER_PREFIX = "Sentiment:"


def sentiment_prompt(text: str, tokenizer) -> str:
    """The chat prompt that asks for a movie sentence's sentiment; the next token is the label.

    Example:
        >>> from qcore.zoo.causal_lm import load_causal_lm_tokenizer
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
        >>> from qcore.zoo.causal_lm import load_causal_lm_tokenizer
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


def sentiment_batches(tokenizer, texts: Sequence[str], labels: Sequence[int] | None = None,
                      batch_size: int = 8, shuffle: bool = False, seed: int = 0,
                      device: str = "cpu") -> list[dict]:
    """Right-padded batches of prompts: the evaluation order, or (``shuffle``) the training order.

    Batches hold prompts of similar token counts (``length_sorted_batches``, or shuffled with
    ``length_grouped_batches`` and ``seed``). Each dict has ``input_ids`` and ``attention_mask``
    (``[b, seq]``), ``index`` (``[b]``, the texts' positions) and, with ``labels``, ``targets``
    (``[b]``, the token id of " negative" or " positive": what ``answer_loss`` trains).

    Example:
        >>> from qcore.zoo.causal_lm import load_causal_lm_tokenizer
        >>> tok = load_causal_lm_tokenizer()
        >>> b = sentiment_batches(tok, ["Dull, long and loud.", "Great fun.", "Bad."], [0, 1, 0], batch_size=2)
        >>> [x["index"].tolist() for x in b], b[0]["targets"].tolist()
        ([[2, 1], [0]], [3524, 2731])
        >>> row, n = b[0]["input_ids"][1], int(b[0]["attention_mask"][1].sum())
        >>> tok.decode(row[:n]).endswith("Great fun.<|im_end|>\\n<|im_start|>assistant\\nSentiment:"), row.shape[0] - n
        (True, 0)
    """
    prompts = [_prompt_ids(tokenizer, t) for t in texts]
    lengths = [len(p) for p in prompts]
    plan = (length_grouped_batches(lengths, batch_size, seed=seed) if shuffle
            else length_sorted_batches(lengths, batch_size))
    ids = label_token_ids(tokenizer)
    out = []
    for idx in plan:
        input_ids, attention_mask = _right_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "index": torch.tensor(idx)}
        if labels is not None:
            batch["targets"] = torch.tensor([ids[labels[i]] for i in idx])
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of the right label word at the prompt's last token (a ``sentiment_batches`` batch)."""
    logits = answer_logits(model, batch["input_ids"], batch["attention_mask"])  # [b, vocab]
    return F.cross_entropy(logits.float(), batch["targets"])


def _shared_prefix_length(batches: list[dict]) -> int:
    """Tokens that every row of every batch starts with, leaving at least one token of the shortest row."""
    first = batches[0]["input_ids"][0]
    n = min(int(b["attention_mask"].sum(1).min()) for b in batches) - 1
    for b in batches:
        same = (b["input_ids"][:, :n] == first[:n]).all(0)  # [n]: columns equal in every row
        n = int(same.int().cumprod(0).sum())
    return n


@torch.no_grad()
def sentiment_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """``[len(texts), 2]`` next-token logits of the two label words after each prompt, in the texts' order.

    Every prompt starts with the same chat template and question (about 43 of its 60-odd
    tokens), so that shared prefix runs once and its key-value cache serves every batch: half
    the work, the same logits (within float rounding) as one prompt at a time.
    """
    model.eval()
    out = torch.empty(len(texts), 2)
    if not len(texts):
        return out
    device, label_ids = next(model.parameters()).device, label_token_ids(tokenizer)
    batches = sentiment_batches(tokenizer, texts, batch_size=batch_size, device=str(device))
    shared = _shared_prefix_length(batches)
    prefix = prefix_cache(model, batches[0]["input_ids"][0, :shared]) if shared else None
    for b in progress(batches, desc="label logits", disable=len(batches) < 2):
        rows = answer_logits(model, b["input_ids"][:, shared:], b["attention_mask"][:, shared:], prefix)
        out[b["index"].cpu()] = rows[:, label_ids].float().cpu()  # [b, 2]
    return out


def sentiment_accuracy(model, tokenizer, split, batch_size: int = 16, limit: int | None = None) -> float:
    """Accuracy on ``split`` (its first ``limit`` sentences) when the larger label-word logit is the prediction.

    Example (two labels: relabelling every sentence turns each hit into a miss):
        >>> from qcore.zoo.causal_lm import load_causal_lm_tokenizer, tiny_causal_lm
        >>> from qcore.zoo.sentiment import Split
        >>> m, tok = tiny_causal_lm(), load_causal_lm_tokenizer()
        >>> texts = ["Great fun.", "Dull and long.", "A gem.", "Nothing works."]
        >>> acc = sentiment_accuracy(m, tok, Split(texts, [1, 0, 1, 0]))
        >>> flipped = sentiment_accuracy(m, tok, Split(texts, [0, 1, 0, 1]))
        >>> acc + flipped, acc in (0.0, 0.25, 0.5, 0.75, 1.0)
        (1.0, True)
    """
    texts, labels = split.texts[:limit], split.labels[:limit]
    preds = sentiment_logits(model, tokenizer, texts, batch_size).argmax(-1)
    return (preds == torch.tensor(labels)).float().mean().item()
