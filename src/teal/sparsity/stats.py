"""Streaming distributions of ``|x|`` at the four input sites of every block.

Calibration never holds activations: each site's input is folded into a histogram as
it passes.  The bins come straight from the float32 bit pattern: for ``|x|`` the bits
are ``exponent:mantissa``, so ``bits >> 15`` keeps the exponent and the top 8 mantissa
bits.  That is a log-spaced grid with 256 bins per octave (relative width at most
2^-8 = 0.39 %) covering every finite float, computed with one integer shift instead of
a logarithm, and identical for every histogram, so histograms add without rebinning.
Within a bin values are interpolated linearly (a bin is linear in value), so the
quantile's error in probability is a small fraction of one bin's mass.

The threshold for sparsity ``p`` at a site is the ``p``-quantile of ``|x|`` there: the
share of channels with ``|x| <= t`` (those ``x * (|x| > t)`` zeroes) is then ``p``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from teal.errors import TealError
from teal.model.decoder import PROJECTIONS, SITE_PROJECTIONS, SITES

SHIFT = 15  # float32 bits dropped: 23 mantissa bits - 8 kept
N_GRID = 1 << (32 - 1 - SHIFT)  # bins over all non-negative float32 bit patterns
# Which site (index into SITES) each projection (index into PROJECTIONS) reads.
PROJECTION_SITE = tuple(
    next(s for s, site in enumerate(SITES) if j in SITE_PROJECTIONS[site])
    for j in range(len(PROJECTIONS))
)


def _bin_edge(index: Tensor) -> Tensor:
    """The float32 value at the lower edge of grid bin ``index`` (int64 tensor)."""
    return (index << SHIFT).to(torch.int32).view(torch.float32)


def check_sparsity(p: float) -> float:
    if not 0.0 <= float(p) < 1.0:
        raise TealError(f"sparsity must be in [0, 1), got {p}: e.g. 0.5 for 50 %")
    return float(p)


def histogram(x: Tensor) -> Tensor:
    """Counts of ``|x|`` over the full grid (int64 ``[N_GRID]``)."""
    bits = x.detach().float().contiguous().view(torch.int32) & 0x7FFFFFFF  # |x|, as bits
    bits >>= SHIFT
    return torch.bincount(bits.flatten(), minlength=N_GRID)


@dataclass
class ActivationStats:
    """Histograms of ``|x|`` per (layer, site): ``counts[layer, site, bin]`` over grid
    bins ``bin_lo .. bin_lo + n_bins - 1`` (sites in the order of ``SITES``)."""

    counts: Tensor  # int64 [n_layers, len(SITES), n_bins]
    bin_lo: int = 0

    def __post_init__(self) -> None:
        if self.counts.dim() != 3 or self.counts.shape[1] != len(SITES):
            raise ValueError(f"counts must be [n_layers, {len(SITES)}, bins]")
        self.counts = self.counts.to(torch.int64)

    # ----- construction ----------------------------------------------------------
    @classmethod
    def empty(cls, n_layers: int) -> ActivationStats:
        return cls(torch.zeros(n_layers, len(SITES), N_GRID, dtype=torch.int64), 0)

    def add(self, layer: int, site: str, x: Tensor) -> None:
        """Fold a batch of activations (any shape, last dim = channels) into the
        histogram of (layer, site).  Needs the full grid (as ``empty`` makes it)."""
        if self.bin_lo != 0 or self.counts.shape[-1] != N_GRID:
            self.counts = self._on_grid(0, N_GRID)
            self.bin_lo = 0
        self.counts[layer, SITES.index(site)] += histogram(x).to(self.counts.device)

    def merge(self, other: ActivationStats) -> ActivationStats:
        """The sum of two statistics of the same model (e.g. from two text shards)."""
        if other.counts.shape[:2] != self.counts.shape[:2]:
            raise ValueError("cannot merge statistics of models with different layer counts")
        lo = min(self.bin_lo, other.bin_lo)
        hi = max(self.bin_lo + self.n_bins, other.bin_lo + other.n_bins)
        return ActivationStats(self._on_grid(lo, hi) + other._on_grid(lo, hi), lo)

    def _on_grid(self, lo: int, hi: int) -> Tensor:
        out = torch.zeros(*self.counts.shape[:2], hi - lo, dtype=torch.int64)
        start = self.bin_lo - lo
        out[..., start : start + self.n_bins] = self.counts
        return out

    def trimmed(self) -> ActivationStats:
        """The same statistics without the empty bins at both ends (for storage)."""
        used = (self.counts.sum((0, 1)) > 0).nonzero().flatten()
        if used.numel() == 0:
            return ActivationStats(self.counts[..., :1].clone(), self.bin_lo)
        a, b = int(used[0]), int(used[-1]) + 1
        return ActivationStats(self.counts[..., a:b].clone(), self.bin_lo + a)

    # ----- tensors ---------------------------------------------------------------
    def to_tensors(self) -> dict[str, Tensor]:
        t = self.trimmed()
        return {"counts": t.counts, "bin_lo": torch.tensor([t.bin_lo], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> ActivationStats:
        counts, bin_lo = tensors["counts"], int(tensors["bin_lo"].flatten()[0])
        if counts.dtype != torch.int64 or (counts < 0).any():
            raise ValueError("histogram counts must be non-negative int64")
        if bin_lo < 0 or bin_lo + counts.shape[-1] > N_GRID:
            raise ValueError("histogram bins fall outside the float32 grid")
        return cls(counts, bin_lo)

    # ----- queries ---------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def n_bins(self) -> int:
        return self.counts.shape[-1]

    def totals(self) -> Tensor:
        """Values seen per (layer, site), int64 ``[n_layers, 4]``."""
        return self.counts.sum(-1)

    def _quantiles(self, counts: Tensor, p: Tensor) -> Tensor:
        """Interpolated ``p``-quantiles of the histograms ``counts[..., bins]`` (``p``
        broadcast to ``counts.shape[:-1]``); 0 where ``p`` is 0."""
        cum = counts.cumsum(-1)
        total = cum[..., -1]
        if (total == 0).any():
            raise TealError("the statistics are empty at some site: calibrate on more text")
        target = p.to(torch.float64) * total.to(torch.float64)
        # First bin whose cumulative count reaches the target.
        k = torch.searchsorted(cum.to(torch.float64), target[..., None]).squeeze(-1)
        k = k.clamp(max=counts.shape[-1] - 1)
        in_bin = counts.gather(-1, k[..., None]).squeeze(-1).to(torch.float64)
        before = (
            cum.gather(-1, k[..., None]).squeeze(-1) - counts.gather(-1, k[..., None]).squeeze(-1)
        ).to(torch.float64)
        frac = ((target - before) / in_bin.clamp(min=1)).clamp(0, 1)
        lo = _bin_edge(k + self.bin_lo).to(torch.float64)
        hi = _bin_edge(k + self.bin_lo + 1).to(torch.float64)
        t = lo + frac * (hi - lo)
        # p = 0 keeps everything but exact zeros, which is the dense result anyway.
        return torch.where(p.to(torch.float64) > 0, t, torch.zeros_like(t)).to(torch.float32)

    def quantile(self, layer: int, site: str, p: float) -> float:
        """The ``p``-quantile of ``|x|`` at (layer, site)."""
        check_sparsity(p)
        counts = self.counts[layer, SITES.index(site)]
        return float(self._quantiles(counts, torch.tensor(p, dtype=torch.float64)))

    def site_quantiles(self, layer: int, site: str, levels: Tensor) -> Tensor:
        """Quantiles of ``|x|`` at (layer, site) for many levels at once (``[n]``)."""
        counts = self.counts[layer, SITES.index(site)]
        levels = levels.to(torch.float64).clamp(0, 1)
        return self._quantiles(counts.expand(levels.numel(), -1), levels.flatten())

    def site_thresholds(self, sparsity: float) -> Tensor:
        """``[n_layers, 4]``: the ``sparsity``-quantile at every (layer, site)."""
        check_sparsity(sparsity)
        p = torch.full(self.counts.shape[:2], float(sparsity), dtype=torch.float64)
        return self._quantiles(self.counts, p)

    def thresholds(self, sparsity: float | Tensor) -> Tensor:
        """Per-(layer, projection) thresholds ``[n_layers, 7]`` for ``model.set_sparsity``.

        ``sparsity`` is one level for every projection (uniform) or a ``[n_layers, 7]``
        table of levels (an allocation); projection ``j`` takes the quantile of the
        site it reads (``SITE_PROJECTIONS``)."""
        shape = (self.n_layers, len(PROJECTIONS))
        if isinstance(sparsity, Tensor):
            levels = sparsity.to(torch.float64)
            if tuple(levels.shape) != shape:
                raise ValueError(f"sparsity table must be {shape}, got {tuple(levels.shape)}")
            if levels.numel() and not bool(((levels >= 0) & (levels < 1)).all()):
                raise TealError("sparsity levels must be in [0, 1)")
        else:
            levels = torch.full(shape, check_sparsity(sparsity), dtype=torch.float64)
        counts = self.counts[:, list(PROJECTION_SITE)]  # [n_layers, 7, bins]
        return self._quantiles(counts, levels)

    def fraction_at_most(self, thresholds: Tensor) -> Tensor:
        """The share of values with ``|x| <= t`` per (layer, projection) for thresholds
        ``[n_layers, 7]``, read off the histograms (the inverse of ``thresholds``)."""
        counts = self.counts[:, list(PROJECTION_SITE)].to(torch.float64)
        cum = counts.cumsum(-1)
        t = thresholds.to(torch.float32).contiguous()
        bits = t.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
        k = (bits >> SHIFT) - self.bin_lo
        inside = (k >= 0) & (k < self.n_bins)
        kc = k.clamp(0, self.n_bins - 1)
        lo = _bin_edge(kc + self.bin_lo).to(torch.float64)
        hi = _bin_edge(kc + self.bin_lo + 1).to(torch.float64)
        frac = ((t.to(torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        below = cum.gather(-1, kc[..., None]).squeeze(-1) - counts.gather(
            -1, kc[..., None]
        ).squeeze(-1)
        val = below + frac * counts.gather(-1, kc[..., None]).squeeze(-1)
        val = torch.where(inside, val, torch.where(k < 0, torch.zeros_like(val), cum[..., -1]))
        return (val / cum[..., -1]).to(torch.float32)

    def __iter__(self) -> Iterator[tuple[int, str, Tensor]]:
        for layer in range(self.n_layers):
            for s, site in enumerate(SITES):
                yield layer, site, self.counts[layer, s]


class _Done(Exception):
    """Raised by the calibration observer once the last site of the last layer is
    recorded: the last down projection, the final norm and the vocabulary-sized head
    (a fifth of this small model's work) do not change any statistic."""


def dense_pass(
    model: torch.nn.Module,
    rows,
    observe,
    stop_after: tuple[int, str] | None = None,
    on_row=None,
) -> None:
    """Run the dense model over each of ``rows`` (``[T]`` or ``[B, T]`` token tensors)
    with ``observe(layer, site, x, pos_mask)`` as its observer; each forward ends right
    after site ``stop_after`` (``(layer, site)``) was observed, since nothing later
    changes what was recorded.  ``on_row(row)`` runs after each row (progress).  The
    model's sparsity mode and observer are restored afterwards."""

    def observer(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        observe(layer, site, x, pos_mask)
        if (layer, site) == stop_after:
            raise _Done

    was_sparse, saved = model.sparse_mode, model.observer
    model.sparse_mode = "off"
    model.observer = observer
    try:
        for row in rows:
            with contextlib.suppress(_Done):
                model((row if row.dim() == 2 else row[None]).to(model.device))
            if on_row is not None:
                on_row(row)
    finally:
        model.observer = saved
        model.sparse_mode = was_sparse


def windows(token_ids: Tensor, seq_len: int, bos: int | None = None) -> list[Tensor]:
    """Split a 1-D token stream into rows of ``seq_len`` (the last may be shorter),
    each starting with ``bos`` if given; a 2-D tensor is taken as rows already."""
    if token_ids.dim() == 2:
        return list(token_ids)
    if token_ids.dim() != 1:
        raise ValueError("token_ids must be 1-D (a stream) or 2-D (windows)")
    if bos is None:
        return list(token_ids.split(seq_len))
    head = token_ids.new_tensor([bos])
    return [torch.cat([head, c]) for c in token_ids.split(seq_len - 1)]


@torch.inference_mode()
def collect_stats(
    model: torch.nn.Module,
    token_ids: Tensor,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    progress: bool = True,
    bos: int | None = None,
) -> ActivationStats:
    """Run the dense model over ``token_ids`` (a 1-D stream cut into windows of
    ``seq_len``, each led by ``bos`` if given; or ``[n, T]`` windows) and histogram
    ``|x|`` at every site."""
    from tqdm.auto import tqdm

    cfg = model.config
    seq_len = min(seq_len, cfg.max_seq_len)
    rows = [r for r in windows(token_ids, seq_len, bos) if r.numel() > 0]
    if not rows:
        raise TealError("no calibration tokens: the text is empty")
    stats = ActivationStats.empty(cfg.n_layers)

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        stats.add(layer, site, x)

    # Equal-length rows batch together; a shorter tail row goes alone.
    batches: list[Tensor] = []
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and j - i < batch_size and rows[j].numel() == rows[i].numel():
            j += 1
        batches.append(torch.stack(rows[i:j]))
        i = j
    total = sum(r.numel() for r in rows)
    with tqdm(
        total=total, unit="tok", desc="calibrating", disable=not progress, dynamic_ncols=True
    ) as bar:
        # Statistics are of the dense model; the last site of the last layer ends a pass.
        dense_pass(
            model, batches, observe, (cfg.n_layers - 1, SITES[-1]), lambda b: bar.update(b.numel())
        )
    return stats.trimmed()
