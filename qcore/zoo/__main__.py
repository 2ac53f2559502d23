"""``python -m qcore.zoo prepare``: fetch the offline assets and build what the labs load."""
import sys

from qcore import assets
from qcore.zoo.austen import fetch_austen
from qcore.zoo.causal_lm import prepare_causal_lm
from qcore.zoo.sentiment import prepare_sentiment_model


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["prepare"]:
        print("usage: python -m qcore.zoo prepare", file=sys.stderr)
        return 2
    try:
        assets.fetch()
        prepare_sentiment_model()
        prepare_causal_lm()
    except assets.AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:  # the perplexity text of lab 6, still in the making: its absence does not stop the others
        fetch_austen()
    except assets.AssetError as e:
        print(f"note: the Jane Austen text (lab 6) is not fetched: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
