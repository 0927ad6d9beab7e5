"""Sparsity methods: how a requested model sparsity becomes one threshold per (layer,
projection).  Each method reads a ``Calibration``; adding one means adding a function
here (greedy allocation will read its tables from the same artifact)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from teal.errors import TealError
from teal.sparsity.artifact import Calibration
from teal.sparsity.stats import check_sparsity


def uniform(calibration: Calibration, sparsity: float) -> Tensor:
    """Every projection of every layer at the same level: its site's quantile."""
    return calibration.stats.thresholds(sparsity)


METHODS: dict[str, Callable[[Calibration, float], Tensor]] = {"uniform": uniform}


def thresholds_for(calibration: Calibration, method: str, sparsity: float) -> Tensor:
    """Thresholds ``[n_layers, 7]`` for ``model.set_sparsity``."""
    check_sparsity(sparsity)
    try:
        fn = METHODS[method]
    except KeyError:
        raise TealError(
            f"unknown sparsity method {method!r}: available are {', '.join(METHODS)}"
        ) from None
    return fn(calibration, sparsity)
