"""Channel scores other than ``|x|``, and their statistics.

* Weight-informed (after WINA): channel ``i`` of a site scores ``|x_i| * s_i`` with
  ``s_i`` the norm of the weight row that input feeds (``wt[i, :]`` in our input-major
  layout, i.e. column ``i`` of ``W``).  Where one input feeds several projections
  (q/k/v, gate/up) the row of the fused buffer covers all of them, so ``s_i`` is the
  norm over every weight that reads it.  The kernels already take a per-channel scale;
  thresholds are quantiles of the score, gathered here in one dense pass.
* CATS: only ``act(gate)`` is thresholded; one mask on it skips the matching rows of
  ``up`` and columns of ``down``.  Its statistics are the distribution of
  ``|act(gate)|``, which no site of the model observes, so the pass computes it from
  the ``mlp_in`` input.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from teal.kernels.reference import apply_act
from teal.model.decoder import SITES
from teal.sparsity.stats import ActivationStats, _Done, windows

# Key in a layer's ``scales`` dict that switches the MLP to CATS (see kernels.dispatch).
CATS_KEY = "mlp_cats"


def weight_scales(model) -> list[dict[str, Tensor]]:
    """Per layer, per site: the norm of each input channel's weight row."""
    out = []
    for blk in model.layers:
        att, mlp = blk.attention, blk.mlp
        out.append(
            {
                "attn_in": att.wqkv.detach().float().norm(dim=1),
                "attn_out": att.wo.detach().float().norm(dim=1),
                "mlp_in": mlp.w_gate_up.detach().float().norm(dim=1),
                "mlp_mid": mlp.w_down.detach().float().norm(dim=1),
            }
        )
    return out


def cats_scales(model) -> list[dict[str, Tensor]]:
    """The per-layer marker that turns on CATS in ``project_gate_up``."""
    marker = torch.ones(1, device=model.device)
    return [{CATS_KEY: marker} for _ in model.layers]


@torch.inference_mode()
def collect_score_stats(
    model,
    token_ids: Tensor,
    *,
    seq_len: int = 2048,
    bos: int | None = None,
    progress: bool = True,
) -> tuple[ActivationStats, ActivationStats]:
    """One dense pass: histograms of the weight-informed score at every site, and of
    ``|act(gate)|`` (held in the ``mlp_mid`` slot; the other slots stay empty)."""
    from tqdm.auto import tqdm

    cfg = model.config
    scales = [{k: v.to(model.device) for k, v in d.items()} for d in weight_scales(model)]
    wi = ActivationStats.empty(cfg.n_layers)
    cats = ActivationStats.empty(cfg.n_layers)
    last = cfg.n_layers - 1

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        wi.add(layer, site, x.float() * scales[layer][site])
        if site == "mlp_in":
            gate = x @ model.layers[layer].mlp.w_gate_up[:, : cfg.ffn_dim]
            cats.add(layer, "mlp_mid", apply_act(gate.float(), cfg.act))
        if layer == last and site == SITES[-1]:
            raise _Done

    rows = [r for r in windows(token_ids, min(seq_len, cfg.max_seq_len), bos) if r.numel()]
    saved = (model.observer, model.sparse_mode)
    model.observer, model.sparse_mode = observe, "off"
    try:
        total = sum(r.numel() for r in rows)
        with tqdm(total=total, unit="tok", desc="scores", disable=not progress) as bar:
            for row in rows:
                with contextlib.suppress(_Done):
                    model(row[None].to(model.device))
                bar.update(row.numel())
    finally:
        model.observer, model.sparse_mode = saved
    return wi.trimmed(), cats.trimmed()


def cats_stats_from(counts: Tensor, bin_lo: int) -> ActivationStats:
    """CATS histograms ``[L, bins]`` as statistics whose every slot is ``|act(gate)|``
    (so the usual quantile code serves)."""
    return ActivationStats(counts[:, None].expand(-1, len(SITES), -1).contiguous(), bin_lo)
