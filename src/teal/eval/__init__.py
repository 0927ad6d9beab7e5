"""Evaluation: text (the default Wikipedia leads or a user file, split into
calibration and evaluation parts) and perplexity in both protocols of METHOD.md."""

from teal.eval.corpus import Corpus, TextPart, bos_token, load_corpus
from teal.eval.perplexity import PROTOCOLS, EvalResult, SparsityMeter, evaluate, perplexity

__all__ = [
    "PROTOCOLS",
    "Corpus",
    "EvalResult",
    "SparsityMeter",
    "TextPart",
    "bos_token",
    "evaluate",
    "load_corpus",
    "perplexity",
]
