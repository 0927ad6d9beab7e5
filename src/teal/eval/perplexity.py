"""Perplexity under sparsity, in the two protocols of METHOD.md, with the sparsity that
was actually applied measured next to the one requested.

* ``full``: every position of every window is sparse; every prediction is scored.
* ``decode-like`` (TEAL's): the first half of each window is dense (a prefill), the
  second half sparse (decode steps); only predictions made at sparse positions are
  scored.  It runs as one parallel forward per window with a per-position switch: a
  position depends only on its own activations and on earlier keys and values, so
  this equals decoding the second half token by token on a KV cache.

Windows are ``window`` tokens long (default 2048, never beyond the model's context)
and start every ``stride`` tokens (default: back to back).  When windows overlap, a
target is scored once, in the first window that scores it.  If the tokenizer adds a
BOS token, each window starts with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from teal.errors import ContextLengthError, TealError
from teal.model.decoder import PROJECTIONS, SITE_PROJECTIONS, SITES
from teal.model.lowrank import model_overhead

PROTOCOLS = ("decode-like", "full")
DEFAULT_WINDOW = 2048


@dataclass
class EvalResult:
    """One row of ``teal eval --json``."""

    method: str
    protocol: str
    sparsity: float
    measured_sparsity: float
    perplexity: float
    tokens: int

    def to_json(self) -> dict:
        row = asdict(self)
        row["measured_sparsity"] = round(self.measured_sparsity, 4)
        row["perplexity"] = round(self.perplexity, 4)
        return row


class SparsityMeter:
    """An observer that counts, per (layer, projection), the input channels that
    ``x * (|x| * s > t)`` zeroes at the sparse positions of each forward pass.

    ``every``: count every n-th sparse position only.  Counting is a few passes over
    every activation, which on a memory-starved CPU costs about as much as the sparse
    forward itself; a regular sample of positions (thousands of positions, every
    channel) changes the figure by far less than 0.1 point."""

    def __init__(
        self,
        config,
        thresholds: Tensor,
        scales: list[dict[str, Tensor]] | None = None,
        every: int = 1,
        overhead: float = 0.0,
    ) -> None:
        self.config = config
        self.overhead = float(overhead)  # weights read densely beside the sparse ones
        self.thresholds = thresholds.detach().float().cpu()
        self.scales = scales
        self.every = max(1, int(every))
        shape = (config.n_layers, len(PROJECTIONS))
        self.zeroed = torch.zeros(shape, dtype=torch.float64)
        self.seen = torch.zeros(shape, dtype=torch.float64)
        self._rows: tuple[Tensor | None, Tensor | None, int] = (None, None, 0)

    def _positions(self, pos_mask: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """Flat indices of the positions to count (None: all of them), cached per mask:
        every layer of one forward pass sees the same mask."""
        mask, rows, size = self._rows
        if mask is pos_mask and size == n and (rows is not None or pos_mask is None):
            return rows
        if pos_mask is None:
            rows = None if self.every == 1 else torch.arange(0, n, self.every, device=device)
        else:
            rows = pos_mask.flatten().to(device).nonzero().squeeze(1)[:: self.every]
        self._rows = (pos_mask, rows, n)
        return rows

    def __call__(self, layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        rows = self._positions(pos_mask, flat.shape[0], flat.device)
        a = (flat if rows is None else flat.index_select(0, rows)).abs()
        if self.scales and "mlp_cats" in self.scales[layer] and site in ("mlp_in", "mlp_mid"):
            self._count_cats(layer, site, a)
            return
        scale = self.scales[layer].get(site) if self.scales else None
        if scale is not None:
            a = a * scale.to(a.dtype)
        done: dict[float, float] = {}  # projections of one site often share a threshold
        for j in SITE_PROJECTIONS[site]:
            t = float(self.thresholds[layer, j])
            if t not in done:
                done[t] = float((a <= t).sum())
            self.zeroed[layer, j] += done[t]
            self.seen[layer, j] += a.numel()

    def _count_cats(self, layer: int, site: str, a: Tensor) -> None:
        """CATS reads gate dense; its one mask on act(gate) arrives at mlp-mid as exact
        zeros, which both the up rows and the down columns skip."""
        if site == "mlp_in":
            self.seen[layer, 4] += a.numel()
            return
        zeros = float((a == 0).sum())
        for j in (5, 6):
            self.zeroed[layer, j] += zeros
            self.seen[layer, j] += a.numel()

    def per_projection(self) -> Tensor:
        """Share of channels zeroed, ``[n_layers, 7]``."""
        return (self.zeroed / self.seen.clamp(min=1)).float()

    def per_site(self) -> Tensor:
        """Share of channels zeroed, ``[n_layers, 4]`` (first projection of each site;
        projections of one site differ only if their thresholds do)."""
        frac = self.per_projection()
        return torch.stack([frac[:, SITE_PROJECTIONS[s][0]] for s in SITES], dim=1)

    def weighted(self) -> float:
        """Weight-weighted sparsity: the share of projection weights whose input was
        zeroed, i.e. of weight bytes a sparse kernel skips."""
        shapes = self.config.projection_shapes
        n = torch.tensor(
            [float(k * m) for k, m in (shapes[p] for p in PROJECTIONS)], dtype=torch.float64
        )
        frac = self.zeroed / self.seen.clamp(min=1)
        skipped = float((frac * n).sum() / (n.sum() * frac.shape[0]))
        # A low-rank split (teal.model.lowrank) reads its dense term in every step.
        return skipped - self.overhead


@dataclass(frozen=True)
class _Window:
    ids: Tensor  # [n] the row fed to the model (BOS first if any)
    dense: int  # positions [0, dense) are dense in the decode-like protocol
    targets: Tensor  # [n - 1] bool: prediction at position i (of ids[i+1]) not yet scored


def plan_windows(
    tokens: Tensor, window: int, stride: int | None = None, bos: int | None = None
) -> list[_Window]:
    """Cut a 1-D stream into evaluation windows (see the module notes)."""
    lead = 0 if bos is None else 1
    span = window - lead  # stream tokens per window
    stride = span if stride is None else stride
    if span < 2 or not 0 < stride <= span:
        raise TealError(f"need window >= {2 + lead} and 0 < stride <= {span}")
    out: list[_Window] = []
    scored_until = 0  # stream index of the first target not yet scored
    n = tokens.numel()
    for start in range(0, n, stride):
        chunk = tokens[start : start + span]
        ids = chunk if bos is None else torch.cat([chunk.new_tensor([bos]), chunk])
        # Target of prediction i is ids[i+1], stream index start + i + 1 - lead.
        stream_idx = torch.arange(ids.numel() - 1) + start + 1 - lead
        targets = stream_idx >= scored_until
        if ids.numel() >= 2:
            out.append(_Window(ids, ids.numel() // 2, targets))
        scored_until = start + chunk.numel()
        if start + span >= n:
            break
    return out


def _scored(w: _Window, protocol: str) -> Tensor:
    """Positions whose prediction counts under ``protocol`` (bool ``[n - 1]``)."""
    if protocol == "full":
        return w.targets
    keep = w.targets.clone()
    keep[: w.dense] = False  # decode-like: only predictions made at sparse positions
    return keep


def _sparse_mask(w: _Window, protocol: str) -> Tensor:
    mask = torch.ones(w.ids.numel(), dtype=torch.bool)
    if protocol == "decode-like":
        mask[: w.dense] = False
    return mask


def _batches(wins: list[_Window], batch_size: int) -> list[list[_Window]]:
    """Consecutive windows of equal length, up to ``batch_size`` at a time."""
    out: list[list[_Window]] = []
    for w in wins:
        if out and len(out[-1]) < batch_size and out[-1][0].ids.numel() == w.ids.numel():
            out[-1].append(w)
        else:
            out.append([w])
    return out


def resolve_window(model, window: int | None) -> int:
    ctx = model.config.max_seq_len
    if window is None:
        return min(DEFAULT_WINDOW, ctx)
    if window > ctx:
        raise ContextLengthError(
            f"a window of {window} tokens exceeds the model's context of {ctx}:"
            f" use --window {ctx} or less"
        )
    return window


@torch.inference_mode()
def evaluate(
    model,
    tokens: Tensor,
    thresholds: dict[float, Tensor | None],
    protocols: Sequence[str] = PROTOCOLS,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    bos: int | None = None,
    method: str = "uniform",
    progress: bool = True,
    meter_every: int = 8,
) -> list[EvalResult]:
    """Perplexity of ``model`` on the 1-D stream ``tokens`` at each requested sparsity
    (``{p: thresholds [n_layers, 7]}``; ``None`` or ``p == 0`` runs dense) under each
    protocol.  Dense is one forward for both protocols (they differ only in which
    predictions are scored).  ``meter_every``: see ``SparsityMeter``."""
    from tqdm.auto import tqdm

    for proto in protocols:
        if proto not in PROTOCOLS:
            raise TealError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {proto!r}")
    wins = plan_windows(tokens, resolve_window(model, window), stride, bos)
    if not wins:
        raise TealError("the evaluation text is too short for one window")
    batches = _batches(wins, batch_size)
    passes: list[tuple[float, Tensor | None, tuple[str, ...]]] = []
    for p, thr in thresholds.items():
        if p == 0 or thr is None:
            passes.append((p, None, tuple(protocols)))
        else:
            passes.extend((p, thr, (proto,)) for proto in protocols)

    results: list[EvalResult] = []
    saved_observer = model.observer
    saved = (model.sparse_mode, model.thresholds.clone(), model.sparse_scales)
    scales = model.sparse_scales
    total = sum(w.ids.numel() for w in wins)
    try:
        for p, thr, protos in passes:
            meter = SparsityMeter(
                model.config,
                thr if thr is not None else torch.zeros_like(model.thresholds),
                scales if thr is not None else None,
                every=meter_every,
                overhead=model_overhead(model) if thr is not None else 0.0,
            )
            model.observer = meter
            # Full protocol on the reference backend: mode "all" sparsifies every position
            # without a per-position mask, sparing a pass per projection.  Other backends
            # get an all-true mask, which routes to the reference (fast kernels serve
            # single-token decode steps only).
            unmasked = protos == ("full",) and model.sparse_backend == "torch"
            if thr is None:
                model.clear_sparsity()
            else:
                model.set_sparsity(thr, mode="all" if unmasked else "decode", scales=scales)
            nll = {proto: 0.0 for proto in protos}
            count = {proto: 0 for proto in protos}
            label = "dense" if thr is None else f"{protos[0]} {p:.0%}"
            with tqdm(
                total=total,
                unit="tok",
                desc=f"eval {label}",
                disable=not progress,
                dynamic_ncols=True,
            ) as bar:
                for group in batches:
                    ids = torch.stack([w.ids for w in group]).to(model.device)
                    mask = None
                    if thr is not None and not unmasked:
                        mask = torch.stack([_sparse_mask(w, protos[0]) for w in group])
                        mask = mask.to(model.device)
                    logits = model(ids, sparse_mask=mask)
                    for proto in protos:
                        sel = torch.stack([_scored(w, proto) for w in group]).to(model.device)
                        pred = logits[:, :-1][sel].float()
                        nll[proto] += float(F.cross_entropy(pred, ids[:, 1:][sel], reduction="sum"))
                        count[proto] += int(sel.sum())
                    del logits
                    bar.update(ids.numel())
            measured = meter.weighted()
            for proto in protos:
                if count[proto] == 0:
                    raise TealError("no tokens were scored: the evaluation text is too short")
                results.append(
                    EvalResult(
                        method,
                        proto,
                        float(p),
                        measured,
                        math.exp(nll[proto] / count[proto]),
                        count[proto],
                    )
                )
    finally:
        model.observer = saved_observer
        if saved[0] == "off":
            model.clear_sparsity()
        else:
            model.set_sparsity(saved[1], mode=saved[0], scales=saved[2])
    order = {proto: i for i, proto in enumerate(protocols)}
    results.sort(key=lambda r: (order[r.protocol], r.sparsity))
    return results


def perplexity(
    model,
    tokens: Tensor,
    *,
    protocol: str = "full",
    thresholds: Tensor | None = None,
    sparsity: float = 0.0,
    **kwargs,
) -> EvalResult:
    """One protocol at one sparsity (``thresholds`` None: dense)."""
    key = sparsity if thresholds is not None else 0.0
    return evaluate(model, tokens, {key: thresholds}, (protocol,), **kwargs)[0]
