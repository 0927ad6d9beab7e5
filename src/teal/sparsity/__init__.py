"""Activation sparsity: statistics of ``|x|`` at every site, the calibration artifact
that stores them, and the methods that turn a sparsity level into thresholds.

    >>> stats = collect_stats(model, token_ids)          # dense pass, histograms
    >>> model.set_sparsity(stats.thresholds(0.5))        # 50 % at every projection
"""

from teal.sparsity.artifact import Calibration
from teal.sparsity.calibrate import DEFAULT_TOKENS, cached_or_new, calibrate, calibrate_text
from teal.sparsity.methods import METHODS, thresholds_for
from teal.sparsity.stats import ActivationStats, collect_stats

__all__ = [
    "DEFAULT_TOKENS",
    "METHODS",
    "ActivationStats",
    "Calibration",
    "cached_or_new",
    "calibrate",
    "calibrate_text",
    "collect_stats",
    "thresholds_for",
]
