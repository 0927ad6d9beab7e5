"""Thresholds calibrated under sparsity: each site's threshold is the quantile of the
activations it sees when everything upstream of it is already sparse.

The histograms of ``stats.py`` are of the *dense* model.  Once upstream projections
drop their small inputs, a site's activations shrink a little (fewer small
contributions add up), so a threshold taken from the dense distribution zeroes more
than it was asked to: on the default model uniform's 50 % measures 52-53 % on held-out
text.  The overshoot is sparsity nobody asked for, and it costs perplexity.

``sequential_levels`` runs one forward over calibration windows with every position
sparse, and at each site, before its projections run, sets their thresholds to the
quantiles of the activations arriving there (layer by layer, site by site, so each sees
its upstream sparse at thresholds already fixed this way).  The result is kept as a
*level correction* in the dense histograms' terms: the dense level whose threshold
equals the one found, minus the level asked for, both read on the same tokens.  Stored
on a grid of requested sparsities per method (``tables`` kind ``seq``), it is added to
the method's nominal levels at any requested sparsity (linear between grid points), and
the thresholds are then read off the full dense histograms as before.  So the stored
calibration stays the dense one, and the correction costs one forward per grid level
and method on a couple of thousand tokens.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from teal.model.decoder import SITE_PROJECTIONS, SITES
from teal.sparsity.stats import ActivationStats, collect_stats

SEQ_TOKENS = 2048  # calibration tokens of the sequential passes (one window)
# Requested sparsities the correction is measured at (0 is no correction); in between
# it is linear.  Seven levels keep the passes to about a minute on a 2-core CPU.
SEQ_GRID = (0.15, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9)


class _Stop(Exception):
    """The last site's threshold is set: the rest of the pass changes nothing."""


@torch.inference_mode()
def sequential_thresholds(model, ids: Tensor, levels: Tensor) -> Tensor:
    """Thresholds ``[n_layers, 7]`` such that, in one pass over ``ids`` ``[B, T]`` with
    every position sparse, projection ``j`` of layer ``l`` zeroes the share
    ``levels[l, j]`` of the activations it actually receives (all upstream sites
    sparse at the thresholds found before it).  The model's sparsity setting and
    observer are restored afterwards."""
    cfg = model.config
    levels = levels.to(torch.float64)
    shape = (cfg.n_layers, 7)
    if tuple(levels.shape) != shape:
        raise ValueError(f"levels must be {shape}, got {tuple(levels.shape)}")
    found = torch.zeros(shape)
    last = (cfg.n_layers - 1, SITES[-1])

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        hist = ActivationStats.empty(1)
        hist.add(0, site, x)
        proj = list(SITE_PROJECTIONS[site])
        t = hist.site_quantiles(0, site, levels[layer, proj])
        found[layer, proj] = t.cpu()
        # The projections of this site read these thresholds right after this call.
        model.thresholds[layer, proj] = t.to(model.thresholds.device)
        if (layer, site) == last:
            raise _Stop

    saved = (model.sparse_mode, model.thresholds.clone(), model.sparse_scales, model.observer)
    backend = model.sparse_backend
    try:
        model.set_backend("torch")
        model.set_sparsity(torch.zeros(shape), mode="all")
        model.observer = observe
        with contextlib.suppress(_Stop):
            model(ids.to(model.device))
    finally:
        model.observer = saved[3]
        model.set_backend(backend)
        if saved[0] == "off":
            model.clear_sparsity()
        else:
            model.set_sparsity(saved[1], mode=saved[0], scales=saved[2])
    return found


def level_correction(dense: ActivationStats, levels: Tensor, thresholds: Tensor) -> Tensor:
    """``[n_layers, 7]``: the dense level (on ``dense``, histograms of the same tokens)
    whose threshold is ``thresholds``, minus ``levels``; 0 where the level is 0."""
    got = dense.fraction_at_most(thresholds).double()
    lv = levels.double()
    return torch.where(lv > 0, got - lv, torch.zeros_like(lv)).float()


@torch.inference_mode()
def correction_table(model, ids: Tensor, nominal, grid=SEQ_GRID, *, progress: bool = True):
    """``[len(grid), n_layers, 7]`` level corrections of one method: ``nominal(p)`` gives
    its levels ``[n_layers, 7]`` at requested sparsity ``p`` (None where it cannot reach
    ``p``: the correction stays 0 there)."""
    from tqdm.auto import tqdm

    ids = ids.to(model.device)
    dense = collect_stats(model, ids, seq_len=ids.shape[1], progress=False)
    out = torch.zeros(len(grid), model.config.n_layers, 7)
    for g, p in enumerate(tqdm(grid, desc="sparse calibration", disable=not progress)):
        lv = nominal(p)
        if lv is None:
            continue
        thr = sequential_thresholds(model, ids, lv)
        out[g] = level_correction(dense, lv, thr)
    return out


def corrected(levels: Tensor, table: Tensor, grid, p: float, max_level: float) -> Tensor:
    """``levels`` ``[n_layers, 7]`` plus the correction at ``p``, linear between the grid
    points (0 at sparsity 0, the last point's beyond the grid); a level that was 0 stays
    0 and none leaves ``[0, max_level]``."""
    xs = [0.0, *(float(v) for v in grid)]
    if p >= xs[-1]:
        delta = table[-1].double()
    else:
        j = next(i for i in range(1, len(xs)) if xs[i] >= p)
        w = (p - xs[j - 1]) / (xs[j] - xs[j - 1])
        lo = torch.zeros_like(table[0]) if j == 1 else table[j - 2]
        delta = lo.double() * (1 - w) + table[j - 1].double() * w
    lv = levels.double()
    top = lv.clamp(min=max_level)  # a level asked above max_level is not lowered to it
    out = torch.where(lv > 0, torch.minimum((lv + delta).clamp(min=0.0), top), lv)
    return out.float()
