"""Sparsity methods: how a requested model sparsity becomes one threshold per (layer,
projection), plus per-channel score scales where the method ranks channels by more
than ``|x|``.  Every method reads a ``Calibration``; all but ``uniform`` also read the
method tables stored in it (``teal.sparsity.tables``).

* ``uniform``: every projection of every layer at the requested level (TEAL's
  baseline).
* ``greedy``: each layer at block sparsity ``p``, its seven projections at the levels
  the greedy block-wise search found (``allocate.greedy_layer``).
* ``greedy-layers``: greedy within layers, and layers at different block sparsities
  (mean ``p``) chosen by least sensitivity-weighted error (``allocate.layer_rows``).
* ``weight-informed``: every projection at level ``p`` of the score ``|x_i| * ||W[:, i]||``.
* ``cats``: only ``act(gate)`` thresholded, skipping up rows and down columns; reaches
  at most the up+down share of the weights.
* ``uniform-seq``, ``greedy-layers-seq``: the same levels, with thresholds calibrated
  under sparsity (each site's quantile taken on the activations it receives with its
  upstream already sparse; ``teal.sparsity.sequential``), so the sparsity applied is
  the sparsity asked for rather than 1-7 points more.
* ``auto`` (the default): at each requested level, the candidate
  (``SELECT_CANDIDATES``) that lost least perplexity on the held-out calibration
  tokens among those that lost no more than ``uniform``, in the protocol that measures
  the sparse mode the setting runs in (decode: decode-like, all: full), or in *both*
  when no mode is given; else ``uniform`` (``select.*`` tables,
  ``tables.method_nll``).  So on held-out calibration text ``auto`` is never worse
  than uniform in the protocol of its mode.

The requested sparsity is always weight-weighted: the share of projection weights
whose input is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from teal.errors import TealError
from teal.sparsity import allocate
from teal.sparsity.artifact import Calibration
from teal.sparsity.stats import check_sparsity

METHODS = (
    "uniform",
    "greedy",
    "greedy-layers",
    "weight-informed",
    "cats",
    "auto",
    "uniform-seq",
    "greedy-layers-seq",
)
# Methods whose levels the sequential (under-sparsity) correction is measured for, in
# the order of the ``seq.delta`` table; ``NAME-seq`` applies it to ``NAME``.
SEQ_BASES = ("uniform", "greedy-layers")
# What ``auto`` chooses from, the fallback first.  Plain ``greedy`` is not a candidate:
# greedy-layers includes it (equal rows in every layer), each extra candidate is one
# more chance to beat uniform on held-out noise alone, and each costs a share of the
# selection's passes.  ``greedy-layers-seq`` is one: its thresholds calibrated under
# sparsity help most at high sparsity and not below about 40 % (docs/RESULTS.md).
SELECT_CANDIDATES = ("uniform", "greedy-layers", "greedy-layers-seq")
# The method the commands use unless told otherwise.  ``auto`` rather than plain
# greedy-layers: greedy-layers is better on most levels, but not at every level in
# every protocol (README, quality table), and ``auto`` falls back to uniform where
# held-out text says it is better.
DEFAULT_METHOD = "auto"
NEEDS_TABLES = frozenset(METHODS) - {"uniform"}


@dataclass
class Setting:
    """What ``model.set_sparsity`` needs for one method at one level."""

    method: str
    sparsity: float
    thresholds: Tensor  # [n_layers, 7]
    scales: list[dict[str, Tensor]] | None = None
    reachable: bool = True
    max_sparsity: float = 1.0  # the most this method can reach on this model
    chosen: str | None = None  # for ``auto``: the method it picked at this level

    def apply(self, model, mode: str = "decode") -> None:
        scales = None
        if self.scales is not None:
            scales = [{k: v.to(model.device) for k, v in d.items()} for d in self.scales]
        model.set_sparsity(self.thresholds, mode=mode, scales=scales)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise TealError(f"unknown sparsity method {method!r}: available are {', '.join(METHODS)}")
    return method


def parse_methods(text: str) -> list[str]:
    """A comma list of methods (``--method uniform,greedy``), checked."""
    out = [m.strip() for m in text.split(",") if m.strip()]
    for m in out:
        if m not in METHODS:
            raise TealError(f"unknown --method {m!r}: available are {', '.join(METHODS)}")
    if not out:
        raise TealError(f"--method needs at least one of {', '.join(METHODS)}")
    return list(dict.fromkeys(out))


def _need_tables(cal: Calibration, method: str) -> None:
    from teal.sparsity.tables import has_tables, kinds_for

    if not has_tables(cal, kinds_for([method])):
        raise TealError(
            f"method {method!r} needs the method tables in the calibration file, which this"
            " one lacks: recalibrate with `teal calibrate` (or let `teal eval` make them)"
        )


def cats_max_sparsity(config) -> float:
    """The most CATS reaches: the up and down share of the projection weights, at the
    highest level a site may take."""
    n = allocate.projection_sizes(config)
    return float(allocate.MAX_LEVEL * (n[5] + n[6]) / n.sum())


def setting_for(
    cal: Calibration, method: str, sparsity: float, model=None, mode: str | None = None
) -> Setting:
    """Thresholds (and scales) of ``method`` at weight-weighted ``sparsity``.  ``model``
    is needed for the methods with scales (weight-informed).  ``mode``: the sparse mode
    the setting will run in (``"decode"``: dense prefill, one-token steps sparse, which
    the decode-like protocol measures; ``"all"``: every position, the full protocol);
    ``auto`` then chooses by that protocol's losses alone, and by both when it is None."""
    check_method(method)
    p = check_sparsity(sparsity)
    if model is not None:
        _check_basis(cal, model)
    stats = cal.stats
    n_layers = stats.n_layers
    # A low-rank split reads its dense term every step: levels rise by its share so
    # that the bytes skipped are the sparsity asked for (teal.model.lowrank).
    extra = cal.lowrank_overhead if p > 0 else 0.0
    if extra and method == "cats":
        raise TealError(
            "CATS does not combine with the low-rank split of this calibration: use"
            " another method or a calibration made without --lowrank"
        )
    if extra and p + extra > allocate.MAX_LEVEL:
        return Setting(method, p, stats.thresholds(0.0), None, False, allocate.MAX_LEVEL - extra)
    if method == "uniform" or p == 0:
        return Setting(method, p, stats.thresholds(p + extra))
    _need_tables(cal, method)
    if method == "auto":
        choice = select_method(cal, p, mode)
        inner = setting_for(cal, choice, p, model)
        inner.method, inner.chosen = "auto", choice
        return inner
    from teal.sparsity import tables

    if method.endswith("-seq"):
        from teal.sparsity.sequential import corrected

        base = method[: -len("-seq")]
        lv = nominal_levels(cal, base, p)
        if lv is None:
            max_s = float(cal.tables["greedy.block_sparsity"][-1])
            return Setting(method, p, stats.thresholds(0.0), None, False, max_s)
        delta = cal.tables["seq.delta"][SEQ_BASES.index(base)]
        lv = corrected(lv, delta, _grid(cal.tables["seq.grid"]), p, allocate.MAX_LEVEL)
        return Setting(method, p, stats.thresholds(lv))
    if method in ("greedy", "greedy-layers"):
        lv = nominal_levels(cal, method, p)
        max_s = float(cal.tables["greedy.block_sparsity"][-1])
        if lv is None:
            return Setting(method, p, stats.thresholds(0.0), None, False, max_s)
        return Setting(method, p, stats.thresholds(lv), None, True, max_s)
    if method == "weight-informed":
        if model is None:
            raise TealError("weight-informed scores need the model (its weight norms)")
        from teal.sparsity.scores import weight_scales

        return Setting(method, p, tables.wi_stats(cal).thresholds(p + extra), weight_scales(model))
    # cats
    if model is None:
        raise TealError("CATS needs the model (its shapes)")
    from teal.sparsity.scores import cats_scales

    max_s = cats_max_sparsity(model.config)
    thr = torch.zeros(n_layers, 7)
    if p > max_s + 1e-9:
        return Setting(method, p, thr, cats_scales(model), False, max_s)
    n = allocate.projection_sizes(model.config)
    level = p * float(n.sum() / (n[5] + n[6]))
    # The gate column carries the threshold on |act(gate)|; the rest stay at 0, which
    # keeps every nonzero input (the zeros CATS makes at mlp-mid are skipped by down).
    thr[:, 4] = tables.cats_stats(cal).site_thresholds(level)[:, 3]
    return Setting(method, p, thr, cats_scales(model), True, max_s)


def _check_basis(cal: Calibration, model) -> None:
    """The attn-out thresholds describe the value basis the calibration was made in, and
    the mlp-in ones its split of the MLP input."""
    from teal.model.lowrank import lowrank_bases, same_split
    from teal.model.rotate import same_basis

    if not same_basis(getattr(model, "value_bases", None), cal.value_bases) or not same_split(
        lowrank_bases(model), cal.lowrank_bases
    ):
        raise TealError(
            "the model is not in this calibration's value basis (teal.model.rotate) or"
            " low-rank split (teal.model.lowrank): bind them first with cal.bind(model)"
            " (Calibration.load(path, model) and teal.sparsify do)"
        )


def nominal_levels(cal: Calibration, method: str, sparsity: float) -> Tensor | None:
    """Levels ``[n_layers, 7]`` of ``uniform``, ``greedy`` or ``greedy-layers`` at
    ``sparsity`` (in the dense histograms' terms); None where the method cannot reach
    it."""
    n_layers, p = cal.stats.n_layers, float(sparsity)
    if p > 0:
        p += cal.lowrank_overhead  # see setting_for
    if method == "uniform":
        return torch.full((n_layers, 7), p)
    levels, rows = cal.tables["greedy.levels"], cal.tables["greedy.block_sparsity"]
    if p > float(rows[-1]) + 1e-6:  # rows are stored in fp32: 0.9 is 0.89999998
        return None
    if method == "greedy":
        target = torch.full((n_layers,), p)
    elif method == "greedy-layers":
        err, sens = cal.tables["greedy.error"], cal.tables["greedy.sensitivity"]
        target = allocate.layer_rows(err, sens, rows, p)
    else:
        raise ValueError(f"no nominal levels for method {method!r}")
    return allocate.interpolate_rows(levels, rows, target)


def _grid(t: Tensor) -> list[float]:
    """A grid of levels stored in fp32, rounded back to the levels it was made at."""
    return [round(v, 6) for v in t.double().tolist()]


# The perplexity protocol (row of ``select.nll``) that measures each sparse mode.
MODE_PROTOCOL = {"decode": 0, "all": 1}


def select_method(cal: Calibration, sparsity: float, mode: str | None = None) -> str:
    """``uniform``, unless another candidate's held-out loss at ``sparsity`` is no
    greater than uniform's in the protocol of ``mode`` (both protocols when ``mode`` is
    None); among those, the least loss summed over those protocols (ties go to the
    earlier candidate; the rule takes any number of candidates).  Losses are linear
    between the levels they were measured at, from zero at sparsity 0.

    Why not the least summed loss alone: one protocol's gain would then pay for the
    other's loss, and the promise is never worse than uniform in either.  Why by mode:
    a setting runs in one mode, which one protocol measures (decode: dense prefill,
    sparse steps; all: every position), and the two can disagree (on the default model
    greedy-layers is better decode-like at 25 % and worse in the full protocol)."""
    nll = cal.tables["select.nll"].double().tolist()  # [protocol][candidate][level]
    if mode is not None:
        if mode not in MODE_PROTOCOL:
            raise ValueError(f"mode must be 'decode' or 'all', not {mode!r}")
        nll = [nll[MODE_PROTOCOL[mode]]]
    xs = [0.0, *_grid(cal.tables["select.grid"])]
    loss = [
        [_interp(xs, [0.0, *row], sparsity) for row in proto] for proto in nll
    ]  # [protocol][candidate]
    base = [proto[0] for proto in loss]  # uniform, the first candidate
    best, best_sum = SELECT_CANDIDATES[0], sum(base)
    for i, name in enumerate(SELECT_CANDIDATES[1:], start=1):
        mine = [proto[i] for proto in loss]
        if all(m <= b for m, b in zip(mine, base, strict=True)) and sum(mine) < best_sum:
            best, best_sum = name, sum(mine)
    return best


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    if x >= xs[-1]:
        return ys[-1]
    j = next(i for i in range(1, len(xs)) if xs[i] >= x)
    w = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
    a, b = ys[j - 1], ys[j]
    if (w > 0 and math.isinf(b)) or (w < 1 and math.isinf(a)):
        return math.inf
    return a if w == 0 else b if w == 1 else a + (b - a) * w


def thresholds_for(cal: Calibration, method: str, sparsity: float) -> Tensor:
    """Thresholds ``[n_layers, 7]`` for ``model.set_sparsity``, for the methods whose
    score is plain ``|x|`` (use ``setting_for`` for the others)."""
    if check_method(method) in ("weight-informed", "cats"):
        raise TealError(f"method {method!r} needs the model: use setting_for(cal, m, p, model)")
    return setting_for(cal, method, sparsity).thresholds
