"""Allocation: how much sparsity each projection of each layer gets.

Greedy block-wise allocation (TEAL's Algorithm 1 in spirit; METHOD.md).  For each
layer separately, all seven projections start dense and are raised step by step; each
step tries raising every projection by ``step_j = delta * N / n_j`` (``n_j`` its weight
count from the config, ``N`` the block's), so every try removes the same weight bytes,
and keeps the try that adds the least error.  One row of levels is recorded per step:
row ``r`` sits at block sparsity ``r * delta`` exactly, up to ``max_block``.

What makes it take minutes, not hours, on a small CPU:

* the error of a try is measured on a few hundred held-out tokens (not thousands),
  on the block inputs cached by one dense pass;
* attention and MLP errors are computed apart: a try recomputes only its own
  projection's output and what follows it inside its sub-block (a ``down`` try is one
  matmul; a ``k`` try one small matmul plus attention and ``o``);
* after a step, only the tries of the sub-block that changed are recomputed; the other
  sub-block's tries are unchanged and reused.

The block error is the sum of the two sub-blocks' squared output errors (both land in
the residual stream), relative to the squared norm of the block's dense output.  It
leaves out how the attention error moves the MLP's input: an approximation that keeps
the two halves independent and each try cheap.

Across layers (``layer_rows``): every layer's error curve is on the same relative
scale and is weighted by a measured sensitivity (how much the final logits move, in
KL, per unit of that layer's block error), then the layers are raised one row at a time
by least weighted added error until the mean block sparsity is the target.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from teal.kernels.reference import gate_up_product
from teal.model.decoder import PROJECTIONS, SITE_PROJECTIONS, SITES, apply_rope

DELTA = 0.01  # block sparsity per greedy step: 91 rows up to 90 %
MAX_BLOCK = 0.9  # the table covers block sparsity 0 .. 90 %
MAX_LEVEL = 0.98  # no projection goes beyond this level (a site's top 2 % always stay)
HELD_OUT_TOKENS = 512  # tokens whose block errors drive the search
HELD_OUT_WINDOW = 256  # tokens per held-out window (attention sees this much context)
SENSITIVITY_LEVEL = 0.5  # the block sparsity at which layer sensitivities are measured
# The first position of each held-out window stays dense in the search and in the
# sensitivities.  Without a BOS token that position becomes an attention sink: from the
# middle layers on it carries almost all of the residual stream's energy (99 % of the
# block output's squared norm on the default model), every later position attends to
# it, and a dense prefill always computes it.  Sparsifying it in the search made the
# search protect k and v for its sake (mean levels 12 % and 1 % at 25 %) and cost
# perplexity at every level in both protocols (docs/RESULTS.md, 2026-12-01 third session).
DENSE_FIRST = True
# How a token's output error counts in the search.  "absolute": squared error summed
# over tokens, so tokens whose residual stream is large dominate.  "per-token": each
# token's squared error divided by its dense block output's squared norm; the next
# block reads RMSNorm(h + e), which moves by about e / rms(h), so this is the error in
# the units the rest of the model sees.  Per-token measured better than absolute on the
# default model in 7 of 8 (protocol, level) cells of greedy-layers (docs/RESULTS.md, 2026-12-04).
ERROR_WEIGHTING = "per-token"
# Which block inputs the search sees.  "dense": those of the dense model.  "sparse":
# those a sparse model feeds it (every earlier layer at the first search's allocation
# for UPSTREAM_LEVEL), with the block's own dense output on them as the reference, so
# each block is fitted to the inputs it meets at run time; the search runs twice.
# Measured on the default model (2026-12-04): better than absolute/dense everywhere but
# mixed against per-token/dense (4 of 8 cells), for twice the search time: off.
SEARCH_INPUTS = "dense"
UPSTREAM_LEVEL = 0.5

_ATTN = (0, 1, 2, 3)
_MLP = (4, 5, 6)


def projection_sizes(config) -> Tensor:
    """Weight count of each projection ``[7]`` (float64), from the config's shapes (so
    grouped-query attention's smaller k and v are counted right)."""
    shapes = config.projection_shapes
    return torch.tensor([float(k * m) for k, m in (shapes[p] for p in PROJECTIONS)])


@dataclass
class BlockInputs:
    """What one block's greedy search needs, captured in a dense pass."""

    attn_x: Tensor  # [B, T, dim] normalised attention input (site attn_in)
    mlp_x: Tensor  # [B, T, dim] normalised MLP input of the dense model (site mlp_in)
    block_in: Tensor  # [B, T, dim] residual stream entering the block
    block_out: Tensor  # [B, T, dim] residual stream leaving the block
    # [B, T, 2 ffn] the dense rank-r term of gate|up under a low-rank split
    # (teal.model.lowrank; mlp_x is then the sparsified remainder), else None.
    mlp_low: Tensor | None = None


def _low_hooks(model, got: dict) -> list:
    """Forward pre-hooks recording each MLP's dense rank-r gate|up term as
    ``got[(layer, "low")]`` (none without a low-rank split)."""

    def hook(i: int) -> Callable:
        def fn(module, args) -> None:
            x = args[0].detach().float()
            got[(i, "low")] = (x @ module.lr_u.float()) @ module.lr_uw.float()

        return fn

    return [
        blk.mlp.register_forward_pre_hook(hook(i))
        for i, blk in enumerate(model.layers)
        if blk.mlp.lr_u is not None
    ]


@torch.inference_mode()
def capture_inputs(model, ids: Tensor) -> list[BlockInputs]:
    """One dense pass over ``ids`` ``[B, T]`` recording each block's inputs and output."""
    n = model.config.n_layers
    got: dict[tuple[int, str], Tensor] = {}

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        if site in ("attn_in", "mlp_in"):
            got[(layer, site)] = x.detach().float().clone()

    def hook(i: int) -> Callable:
        def fn(module, args, output) -> None:
            got[(i, "in")] = args[0].detach().float().clone()
            got[(i, "out")] = output.detach().float().clone()

        return fn

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(model.layers)]
    handles += _low_hooks(model, got)
    saved = (model.observer, model.sparse_mode)
    model.observer, model.sparse_mode = observe, "off"
    try:
        model(ids.to(model.device))
    finally:
        model.observer, model.sparse_mode = saved
        for h in handles:
            h.remove()
    return [
        BlockInputs(
            got[(i, "attn_in")],
            got[(i, "mlp_in")],
            got[(i, "in")],
            got[(i, "out")],
            got.get((i, "low")),
        )
        for i in range(n)
    ]


@torch.inference_mode()
def capture_sparse_inputs(
    model, ids: Tensor, thresholds: Tensor, dense_first: bool = DENSE_FIRST
) -> list[BlockInputs]:
    """Each block's inputs in a pass with every block sparse at ``thresholds [L, 7]``
    (every position, the first one dense if ``dense_first``), and what the block makes
    of its input dense: the normalised attention and MLP inputs and its output."""
    ids = ids.to(model.device)
    block_in: dict[int, Tensor] = {}

    def hook(i: int) -> Callable:
        def fn(module, args) -> None:
            block_in[i] = args[0].detach().clone()

        return fn

    handles = [blk.register_forward_pre_hook(hook(i)) for i, blk in enumerate(model.layers)]
    saved = (model.observer, model.sparse_mode, model.thresholds.clone(), model.sparse_scales)
    mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if dense_first:
        mask[:, 0] = False
    try:
        model.observer = None
        model.set_sparsity(thresholds, mode="all")
        model(ids, sparse_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.observer, model.sparse_mode = saved[0], saved[1]
        model.thresholds.copy_(saved[2])
        model.sparse_scales = saved[3]
    seqlen = ids.shape[1]
    pos = torch.arange(seqlen, device=ids.device)
    freqs = pos.float()[:, None] * model.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    rope = (emb.cos().to(model.dtype), emb.sin().to(model.dtype))
    out = []
    low: dict = {}
    handles = _low_hooks(model, low)
    try:
        for i, blk in enumerate(model.layers):
            got: dict[str, Tensor] = {}

            def observe(layer, site, x, pos_mask, got: dict[str, Tensor] = got) -> None:
                if site in ("attn_in", "mlp_in"):
                    got[site] = x.detach().float().clone()

            mask_i = model._mask(pos, pos, model.config.sliding_windows[i])
            h = blk(block_in[i], rope, mask_i, None, None, observe)
            low_i = low.get((i, "low"))
            out.append(
                BlockInputs(got["attn_in"], got["mlp_in"], block_in[i].float(), h.float(), low_i)
            )
    finally:
        for hd in handles:
            hd.remove()
    return out


def _sparsify(x: Tensor, t: float, dense_first: bool = False) -> Tensor:
    if t <= 0:
        return x
    out = x * (x.abs() > t)
    if dense_first:  # the first position of each window stays dense
        out[:, :1] = x[:, :1]
    return out


def token_weights(inputs: BlockInputs, weighting: str | None) -> tuple[Tensor | None, float]:
    """Per-token weights ``[B, T, 1]`` of the squared output error (None: all 1) and the
    normaliser that makes the block error relative (the weighted dense output energy)."""
    weighting = weighting or ERROR_WEIGHTING
    energy = inputs.block_out.square().sum(-1, keepdim=True)
    if weighting == "absolute":
        return None, float(energy.sum()) or 1.0
    if weighting == "per-token":
        w = 1.0 / energy.clamp(min=1e-30)
        return w, float(energy.numel())
    raise ValueError(f"error weighting must be 'absolute' or 'per-token', got {weighting!r}")


def _sq_err(y: Tensor, ref: Tensor, w: Tensor | None) -> float:
    d = (y - ref).square()
    return float(d.sum() if w is None else (d.sum(-1, keepdim=True) * w).sum())


class _Block:
    """One block's weights in fp32 and the attention geometry, with the pieces a try
    recomputes."""

    def __init__(
        self,
        model,
        layer: int,
        seq_len: int,
        dense_first: bool = DENSE_FIRST,
        mlp_low: Tensor | None = None,
    ) -> None:
        cfg = model.config
        blk = model.layers[layer]
        att, mlp = blk.attention, blk.mlp
        self.cfg = cfg
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        wqkv = att.wqkv.detach().float()
        bias = att.bqkv.detach().float() if att.bqkv is not None else None
        cuts = ((0, q), (q, q + kv), (q + kv, q + 2 * kv))
        self.w = [wqkv[:, a:b] for a, b in cuts]
        self.b = [None if bias is None else bias[a:b] for a, b in cuts]
        self.w.append(att.wo.detach().float())
        ffn = cfg.ffn_dim
        wgu = mlp.w_gate_up.detach().float()
        self.w += [wgu[:, :ffn], wgu[:, ffn:], mlp.w_down.detach().float()]
        # The dense rank-r terms of gate and up under a low-rank split, added to their
        # sparse products of the remainder (what MLP.forward computes).
        self.low = [None] * 7
        if mlp_low is not None:
            self.low[4], self.low[5] = mlp_low[..., :ffn], mlp_low[..., ffn:]
        self.act = cfg.act
        self.dense_first = dense_first
        pos = torch.arange(seq_len, device=wqkv.device)
        freqs = pos.float()[:, None] * model.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope = (emb.cos(), emb.sin())
        self.mask = model._mask(pos, pos, cfg.sliding_windows[layer])

    def proj(self, j: int, x: Tensor, t: float) -> Tensor:
        y = _sparsify(x, t, self.dense_first) @ self.w[j]
        b = self.b[j] if j < 3 else self.low[j]
        return y if b is None else y + b

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cfg = self.cfg
        bsz, seqlen, _ = q.shape
        cos, sin = self.rope
        qh = q.view(bsz, seqlen, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        kh = k.view(bsz, seqlen, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        vh = v.view(bsz, seqlen, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        qh, kh = apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=self.mask, enable_gqa=cfg.n_heads != cfg.n_kv_heads
        )
        return out.transpose(1, 2).reshape(bsz, seqlen, cfg.n_heads * cfg.head_dim)

    def mid(self, gate: Tensor, up: Tensor) -> Tensor:
        return gate_up_product(gate, up, self.act)


@torch.inference_mode()
def greedy_layer(
    model,
    layer: int,
    inputs: BlockInputs,
    site_thresholds: Callable[[int, Tensor], Tensor],
    *,
    delta: float = DELTA,
    max_block: float = MAX_BLOCK,
    max_level: float = MAX_LEVEL,
    dense_first: bool = DENSE_FIRST,
    weighting: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Greedy levels of one layer: ``levels [R, 7]`` and relative block error ``[R]`` at
    block sparsity ``r * delta`` for ``r = 0 .. R-1``.

    ``site_thresholds(j, levels)`` gives projection ``j``'s thresholds at the given
    levels (quantiles of the calibration statistics of the site it reads)."""
    blk = _Block(model, layer, inputs.attn_x.shape[1], dense_first, inputs.mlp_low)
    sizes = projection_sizes(model.config)
    step = (delta * sizes.sum() / sizes).tolist()
    n_rows = int(round(max_block / delta)) + 1
    # Thresholds on each projection's grid of levels, looked up once.
    max_k = [int(math.floor(max_level / s + 1e-9)) for s in step]
    thr = [
        site_thresholds(j, torch.arange(max_k[j] + 1, dtype=torch.float64) * step[j]).tolist()
        for j in range(len(PROJECTIONS))
    ]
    ax, mx = inputs.attn_x, inputs.mlp_x
    # Dense references and the current (sparse) state of each piece.
    qkv = [blk.proj(j, ax, 0.0) for j in range(3)]
    att = blk.attention(*qkv)
    y_att_dense = att @ blk.w[3]
    gate, up = blk.proj(4, mx, 0.0), blk.proj(5, mx, 0.0)
    mid = blk.mid(gate, up)
    y_mlp_dense = mid @ blk.w[6]
    w, norm = token_weights(inputs, weighting)
    k = [0] * 7
    err = {"attn": 0.0, "mlp": 0.0}

    def err_of(y: Tensor, ref: Tensor) -> float:
        return _sq_err(y, ref, w)

    def try_step(j: int) -> tuple[float, tuple]:
        """Sub-block error if projection ``j`` rose one step, and the new state."""
        t = thr[j][k[j] + 1]
        if j < 3:
            new = list(qkv)
            new[j] = blk.proj(j, ax, t)
            a = blk.attention(*new)
            y = blk.proj(3, a, thr[3][k[3]])
            return err_of(y, y_att_dense), (new, a)
        if j == 3:
            y = blk.proj(3, att, t)
            return err_of(y, y_att_dense), (qkv, att)
        if j == 6:
            return err_of(blk.proj(6, mid, t), y_mlp_dense), (gate, up, mid)
        g = blk.proj(4, mx, t) if j == 4 else gate
        u = blk.proj(5, mx, t) if j == 5 else up
        m = blk.mid(g, u)
        return err_of(blk.proj(6, m, thr[6][k[6]]), y_mlp_dense), (g, u, m)

    levels = torch.zeros(n_rows, 7, dtype=torch.float64)
    errors = torch.zeros(n_rows, dtype=torch.float64)
    cand: dict[int, tuple[float, tuple]] = {}
    for r in range(1, n_rows):
        best, best_add = -1, math.inf
        for j in range(7):
            if k[j] + 1 > max_k[j]:
                continue
            if j not in cand:
                cand[j] = try_step(j)
            added = cand[j][0] - err["attn" if j in _ATTN else "mlp"]
            if added < best_add:
                best, best_add = j, added
        if best < 0:  # every projection at its cap: the rest of the table stays here
            levels[r:] = levels[r - 1]
            errors[r:] = errors[r - 1]
            break
        e, state = cand[best]
        k[best] += 1
        if best in _ATTN:
            err["attn"] = e
            qkv, att = state
            for j in _ATTN:
                cand.pop(j, None)
        else:
            err["mlp"] = e
            gate, up, mid = state
            for j in _MLP:
                cand.pop(j, None)
        levels[r] = torch.tensor([k[j] * step[j] for j in range(7)], dtype=torch.float64)
        errors[r] = (err["attn"] + err["mlp"]) / norm
    return levels.float(), errors.float()


def held_out_windows(tokens: Tensor, window: int, bos: int | None) -> Tensor:
    """``[B, window]`` rows cut from a 1-D stream (each led by ``bos`` if given); the
    tail that does not fill a row is dropped."""
    span = window - (bos is not None)
    n = tokens.numel() // span
    if n == 0:
        raise ValueError(f"need at least {span} held-out tokens, got {tokens.numel()}")
    rows = tokens[: n * span].view(n, span)
    if bos is not None:
        rows = torch.cat([rows.new_full((n, 1), bos), rows], dim=1)
    return rows


@torch.inference_mode()
def greedy_tables(
    model,
    stats,
    ids: Tensor,
    *,
    delta: float = DELTA,
    max_block: float = MAX_BLOCK,
    max_level: float = MAX_LEVEL,
    dense_first: bool = DENSE_FIRST,
    weighting: str | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Greedy tables of every layer on held-out windows ``ids`` ``[B, T]``:
    ``levels [L, R, 7]``, ``error [L, R]``, ``block_sparsity [R]`` and ``sensitivity
    [L]`` (see ``layer_sensitivity``)."""
    inputs = capture_inputs(model, ids)
    search = _search_all(
        model, stats, inputs, delta, max_block, max_level, dense_first, weighting, progress
    )
    if SEARCH_INPUTS == "sparse":
        at = layer_rows(
            search["error"], search["sensitivity"], search["block_sparsity"], UPSTREAM_LEVEL
        )
        lv = interpolate_rows(search["levels"], search["block_sparsity"], at)
        upstream = capture_sparse_inputs(model, ids, stats.thresholds(lv), dense_first)
        search = _search_all(
            model,
            stats,
            upstream,
            delta,
            max_block,
            max_level,
            dense_first,
            weighting,
            progress,
            sens_inputs=inputs,
        )
    elif SEARCH_INPUTS != "dense":
        raise ValueError(f"search inputs must be 'dense' or 'sparse', got {SEARCH_INPUTS!r}")
    return search


def _search_all(
    model,
    stats,
    inputs,
    delta,
    max_block,
    max_level,
    dense_first,
    weighting,
    progress,
    sens_inputs=None,
) -> dict[str, Tensor]:
    from tqdm.auto import tqdm

    site_of = [next(s for s in SITES if j in SITE_PROJECTIONS[s]) for j in range(7)]
    all_levels, all_errors = [], []
    for layer in tqdm(range(model.config.n_layers), desc="greedy", disable=not progress):

        def site_thr(j: int, lv: Tensor, layer: int = layer) -> Tensor:
            return stats.site_quantiles(layer, site_of[j], lv)

        lv, er = greedy_layer(
            model,
            layer,
            inputs[layer],
            site_thr,
            delta=delta,
            max_block=max_block,
            max_level=max_level,
            dense_first=dense_first,
            weighting=weighting,
        )
        all_levels.append(lv)
        all_errors.append(er)
    levels = torch.stack(all_levels)
    errors = torch.stack(all_errors)
    rows = torch.arange(levels.shape[1], dtype=torch.float64) * delta
    sens = layer_sensitivity(
        model,
        stats,
        sens_inputs or inputs,
        levels,
        errors,
        rows,
        dense_first=dense_first,
        progress=progress,
    )
    return {
        "levels": levels,
        "error": errors,
        "block_sparsity": rows.float(),
        "sensitivity": sens,
    }


@torch.inference_mode()
def layer_sensitivity(
    model,
    stats,
    inputs: list[BlockInputs],
    levels: Tensor,
    errors: Tensor,
    rows: Tensor,
    *,
    level: float = SENSITIVITY_LEVEL,
    dense_first: bool = DENSE_FIRST,
    progress: bool = True,
) -> Tensor:
    """Per layer: KL(dense || sparse) of the next-token distribution, per unit of
    relative block error, when only that layer runs at its greedy row for ``level``.
    Each measurement starts at the layer's cached input, so it costs the blocks from
    that layer on plus the head."""
    from tqdm.auto import tqdm

    from teal.kernels.dispatch import SparseCall

    n = model.config.n_layers
    r = min(int(round(level / float(rows[1] - rows[0]))), levels.shape[1] - 1)
    head = model.tok_embeddings.weight if model.lm_head is None else model.lm_head
    seqlen = inputs[0].block_in.shape[1]
    pos = torch.arange(seqlen, device=model.device)
    freqs = pos.float()[:, None] * model.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    dtype = model.dtype
    rope = (emb.cos().to(dtype), emb.sin().to(dtype))
    masks = {w: model._mask(pos, pos, w) for w in set(model.config.sliding_windows)}
    pos_mask = None
    if dense_first:
        pos_mask = torch.ones(inputs[0].block_in.shape[:2], dtype=torch.bool, device=model.device)
        pos_mask[:, 0] = False

    def logprobs(h: Tensor) -> Tensor:
        return F.log_softmax(F.linear(model.norm(h), head).float(), dim=-1)

    dense = logprobs(inputs[-1].block_out.to(dtype))
    out = torch.zeros(n)
    for layer in tqdm(range(n), desc="sensitivity", disable=not progress):
        table = torch.zeros(n, 7, dtype=torch.float64)
        table[layer] = levels[layer, r].double()
        thr = stats.thresholds(table)[layer].to(model.device)
        h = inputs[layer].block_in.to(dtype)
        for i in range(layer, n):
            call = SparseCall(thr, pos_mask, None, "torch") if i == layer else None
            blk = model.layers[i]
            h = blk(h, rope, masks[model.config.sliding_windows[i]], None, call, None)
        lp = logprobs(h)
        kl = float((dense.exp() * (dense - lp)).sum(-1).mean())
        out[layer] = kl / max(float(errors[layer, r]), 1e-12)
    return out


def interpolate_rows(levels: Tensor, rows: Tensor, target: Tensor) -> Tensor:
    """Levels ``[L, 7]`` at block sparsity ``target[L]``: linear between the two table
    rows around it (rows are evenly spaced), so the block sparsity is exactly the
    target."""
    delta = float(rows[1] - rows[0])
    x = (target.double() / delta).clamp(0, levels.shape[1] - 1)
    lo = x.floor().long().clamp(max=levels.shape[1] - 1)
    hi = (lo + 1).clamp(max=levels.shape[1] - 1)
    w = (x - lo.double())[:, None]
    idx = torch.arange(levels.shape[0])
    return (levels[idx, lo].double() * (1 - w) + levels[idx, hi].double() * w).float()


def layer_rows(errors: Tensor, weights: Tensor, rows: Tensor, target: float) -> Tensor:
    """Block sparsity per layer ``[L]`` whose mean is ``target``, chosen by raising one
    layer one row at a time where the weighted error grows least (the same greedy rule
    as within a block, one level up; all layers have the same size)."""
    n, n_rows = errors.shape
    delta = float(rows[1] - rows[0])
    max_s = float(rows[-1])
    if target >= max_s:
        return torch.full((n,), max_s)
    total = target * n / delta  # row steps to hand out, possibly fractional
    whole = int(math.floor(total + 1e-9))
    cost = errors.double() * weights.double().clamp(min=0)[:, None]
    at = [0] * n
    heap = [(float(cost[i, 1] - cost[i, 0]), i) for i in range(n)]
    heapq.heapify(heap)
    for _ in range(whole):
        _, i = heapq.heappop(heap)
        at[i] += 1
        if at[i] + 1 < n_rows:
            heapq.heappush(heap, (float(cost[i, at[i] + 1] - cost[i, at[i]]), i))
    out = torch.tensor(at, dtype=torch.float64) * delta
    frac = total - whole
    if frac > 1e-9 and heap:  # the remainder goes to the next layer in line
        _, i = heap[0]
        out[i] += frac * delta
    return out.float()


@torch.inference_mode()
def block_error(
    model,
    layer: int,
    inputs: BlockInputs,
    thresholds: Tensor,
    dense_first: bool = DENSE_FIRST,
    weighting: str | None = None,
) -> float:
    """The greedy search's error measure for one layer at thresholds ``[7]``: squared
    error of the attention and MLP outputs against dense, relative to the squared
    norm of the block's dense output."""
    blk = _Block(model, layer, inputs.attn_x.shape[1], dense_first, inputs.mlp_low)
    t = [float(v) for v in thresholds]
    ax, mx = inputs.attn_x, inputs.mlp_x
    w, norm = token_weights(inputs, weighting)
    dense_att = blk.attention(*(blk.proj(j, ax, 0.0) for j in range(3)))
    att = blk.attention(*(blk.proj(j, ax, t[j]) for j in range(3)))
    e = _sq_err(blk.proj(3, att, t[3]), dense_att @ blk.w[3], w)
    dense_mid = blk.mid(blk.proj(4, mx, 0.0), blk.proj(5, mx, 0.0))
    mid = blk.mid(blk.proj(4, mx, t[4]), blk.proj(5, mx, t[5]))
    e += _sq_err(blk.proj(6, mid, t[6]), dense_mid @ blk.w[6], w)
    return e / norm
