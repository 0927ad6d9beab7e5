"""The method tables a calibration carries beside its ``|x|`` histograms: greedy
allocation tables and layer sensitivities, weight-informed score histograms and CATS
histograms.  Made once per calibration, stored in the same artifact, read by
``teal.sparsity.methods`` at any requested sparsity."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from teal.sparsity import allocate
from teal.sparsity.artifact import Calibration
from teal.sparsity.scores import collect_score_stats
from teal.sparsity.stats import ActivationStats

TABLES_METHOD = "greedy-blockwise+wi+cats"
TABLES_VERSION = 3  # 2: greedy search with the first position of each window dense;
# 3: each token's error relative to its own output energy (allocate.ERROR_WEIGHTING)
# Two kinds, made apart so a command pays only for what its methods read: the greedy
# search (greedy, greedy-layers) and the score histograms (weight-informed, cats).
KINDS = {
    "greedy": ("greedy.levels", "greedy.error", "greedy.block_sparsity", "greedy.sensitivity"),
    "scores": ("wi.counts", "wi.bin_lo", "cats.counts", "cats.bin_lo"),
    # NAME-seq: level corrections from thresholds calibrated under sparsity, per base
    # method and grid level (``teal.sparsity.sequential``; needs greedy).
    "seq": ("seq.delta", "seq.grid"),
    # auto: held-out perplexity loss of each candidate method at a grid of levels, in
    # both evaluation protocols (needs greedy).
    "select": ("select.nll", "select.grid"),
}
SELECT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Held-out tokens for the selection, taken after the greedy search's own (a method is
# not judged on the tokens it was fitted to).  Differences of a few hundredths of a nat
# decide the choice at low sparsity; on the default model the loss of one window of
# HELD_OUT_WINDOW tokens spreads by about 0.02-0.04 nat, so four windows resolve a
# difference of 0.03 at about two standard errors.  More would cost `teal run` its
# 10 minutes on a 2-core CPU (the selection is 3 candidates x 9 levels x 1.5 passes).
SELECT_TOKENS = 1024
NAMES = tuple(n for names in KINDS.values() for n in names)


def kinds_for(methods) -> tuple[str, ...]:
    need = set()
    for m in methods:
        if m in ("greedy", "greedy-layers"):
            need.add("greedy")
        elif m == "auto":
            from teal.sparsity.methods import SELECT_CANDIDATES

            need.update(("greedy", "select"))
            if any(c.endswith("-seq") for c in SELECT_CANDIDATES):
                need.add("seq")
        elif m.endswith("-seq"):
            need.update(("greedy", "seq"))
        elif m in ("weight-informed", "cats"):
            need.add("scores")
    return tuple(k for k in KINDS if k in need)


def has_tables(cal: Calibration, kinds=tuple(KINDS)) -> bool:
    meta = cal.metadata.get("tables") or {}
    return (
        meta.get("method") == TABLES_METHOD
        and meta.get("version") == TABLES_VERSION
        and all(n in cal.tables for k in kinds for n in KINDS[k])
    )


def add_tables(
    model,
    cal: Calibration,
    stats_tokens: Tensor,
    held_out: Tensor,
    *,
    held_out_is_disjoint: bool = True,
    kinds: tuple[str, ...] = tuple(KINDS),
    progress: bool = True,
) -> Calibration:
    """Compute every method table into ``cal`` (in place; also returned).

    ``stats_tokens``: the tokens the histograms were gathered on (the score histograms
    are gathered on the same ones); ``held_out``: a 1-D stream of other calibration
    tokens: the first ``HELD_OUT_TOKENS`` drive the greedy search, the next
    ``SELECT_TOKENS`` the method selection (the first ones again if there are fewer)."""
    from teal.model.rotate import set_value_bases

    set_value_bases(model, cal.value_bases)  # the basis the histograms were gathered in
    seq_len = int(cal.metadata.get("seq_len") or 2048)
    bos = cal.metadata.get("bos")
    meta = dict(cal.metadata.get("tables") or {})
    if meta.get("method") != TABLES_METHOD or meta.get("version") != TABLES_VERSION:
        meta = {"method": TABLES_METHOD, "version": TABLES_VERSION}
        for name in NAMES:
            cal.tables.pop(name, None)
    # Only what is missing is made (a file with greedy tables gains the select ones
    # without the greedy search running again).
    kinds = tuple(k for k in KINDS if k in kinds and not all(n in cal.tables for n in KINDS[k]))
    from teal.sparsity.methods import SELECT_CANDIDATES

    seq_candidates = any(c.endswith("-seq") for c in SELECT_CANDIDATES)
    if "select" in kinds and seq_candidates and "seq.delta" not in cal.tables:
        kinds = (*kinds, "seq")  # the selection measures the -seq candidates
    if "greedy" in kinds:  # tables made from older greedy tables are made again
        kinds = (
            *kinds,
            *(k for k in ("seq", "select") if k not in kinds and KINDS[k][0] in cal.tables),
        )
    needs_greedy = "select" in kinds or "seq" in kinds
    if needs_greedy and "greedy" not in kinds and "greedy.levels" not in cal.tables:
        kinds = ("greedy", *kinds)
    if "scores" in kinds:
        start = time.perf_counter()
        wi, cats = collect_score_stats(
            model, stats_tokens, seq_len=seq_len, bos=bos, progress=progress
        )
        wi_t, cats_t = wi.to_tensors(), cats.to_tensors()
        site = 3  # CATS histograms live in the mlp_mid slot
        cal.tables.update({"wi.counts": wi_t["counts"], "wi.bin_lo": wi_t["bin_lo"]})
        cal.tables.update(
            {"cats.counts": cats_t["counts"][:, site].contiguous(), "cats.bin_lo": cats_t["bin_lo"]}
        )
        meta["seconds_scores"] = round(time.perf_counter() - start, 1)
    if "greedy" in kinds:
        start = time.perf_counter()
        window = min(allocate.HELD_OUT_WINDOW, model.config.max_seq_len)
        ids = allocate.held_out_windows(held_out[: allocate.HELD_OUT_TOKENS], window, bos)
        greedy = allocate.greedy_tables(model, cal.stats, ids, progress=progress)
        cal.tables.update({f"greedy.{k}": v for k, v in greedy.items()})
        meta.update(
            held_out_tokens=int(ids.numel()),
            held_out_disjoint=held_out_is_disjoint,
            greedy_delta=allocate.DELTA,
            greedy_dense_first=allocate.DENSE_FIRST,
            greedy_error_weighting=allocate.ERROR_WEIGHTING,
            greedy_search_inputs=allocate.SEARCH_INPUTS,
            seconds_greedy=round(time.perf_counter() - start, 1),
        )
    if "seq" in kinds:
        from teal.sparsity import sequential
        from teal.sparsity.methods import SEQ_BASES, nominal_levels

        start = time.perf_counter()
        cal.metadata["tables"] = meta
        lead = bos is not None
        span = min(sequential.SEQ_TOKENS, model.config.max_seq_len) - lead
        span = min(span, stats_tokens.numel())
        ids = allocate.held_out_windows(stats_tokens[:span], span + lead, bos)[:1]
        cal.tables["seq.delta"] = torch.stack(
            [
                sequential.correction_table(
                    model, ids, lambda p, b=base: nominal_levels(cal, b, p), progress=progress
                )
                for base in SEQ_BASES
            ]
        )
        cal.tables["seq.grid"] = torch.tensor(sequential.SEQ_GRID, dtype=torch.float32)
        meta.update(seq_tokens=int(ids.numel()), seconds_seq=round(time.perf_counter() - start, 1))
    if "select" in kinds:
        start = time.perf_counter()
        cal.metadata["tables"] = meta  # setting_for checks the tables' identity
        window = min(allocate.HELD_OUT_WINDOW, model.config.max_seq_len)
        after = held_out[allocate.HELD_OUT_TOKENS : allocate.HELD_OUT_TOKENS + SELECT_TOKENS]
        apart = after.numel() >= window - (bos is not None)
        ids = allocate.held_out_windows(after if apart else held_out[:SELECT_TOKENS], window, bos)
        cal.tables["select.nll"] = method_nll(model, cal, ids, SELECT_GRID, progress=progress)
        cal.tables["select.grid"] = torch.tensor(SELECT_GRID, dtype=torch.float32)
        cal.tables.pop("select.kl", None)  # the KL table of files made before
        meta.update(
            select_tokens=int(ids.numel()),
            select_candidates=list(SELECT_CANDIDATES),
            select_apart_from_greedy=apart,
            seconds_select=round(time.perf_counter() - start, 1),
        )
    cal.metadata["tables"] = meta
    return cal


@torch.inference_mode()
def method_nll(model, cal: Calibration, ids: Tensor, grid, *, progress: bool = True) -> Tensor:
    """``[2, candidates, levels]``: mean next-token NLL increase over dense (nats per
    scored token) on ``ids`` ``[B, T]``, for each ``auto`` candidate at each level, in
    the two perplexity protocols (``teal.eval.perplexity.PROTOCOLS`` order):
    decode-like (first half of each row dense, predictions of the second half scored)
    and full (every position sparse and scored).  inf where a method cannot reach a
    level.  The model's sparsity setting is cleared afterwards.

    Both protocols, and the loss on the real next tokens rather than the distance from
    dense: a method that moves the dense distribution less can still lose more
    perplexity, and the two protocols can rank methods differently (on the default
    model, sparsifying the first position of a window, which every later position
    attends to, lowers uniform's full-protocol loss at 20-25 % below greedy's, while
    greedy is better decode-like).  The decode-like rows reuse one dense prefill of
    the first halves through the KV cache, so they cost half a pass."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from teal.sparsity.methods import SELECT_CANDIDATES, setting_for

    ids = ids.to(model.device)
    bsz, seqlen = ids.shape
    half = seqlen // 2
    targets = ids[:, 1:]
    backend = model.sparse_backend
    saved_cache = ([blk.attention.kv_cache for blk in model.layers], model.cache_len)
    rest = torch.arange(half, seqlen, device=ids.device)

    def nll(logits: Tensor, tgt: Tensor) -> Tensor:  # per scored token
        return F.cross_entropy(logits.float().transpose(1, 2), tgt, reduction="none")

    out = torch.full((2, len(SELECT_CANDIDATES), len(grid)), float("inf"))
    bar = tqdm(total=out[0].numel(), desc="method selection", disable=not progress, file=sys.stderr)
    try:
        model.set_backend("torch")
        model.clear_sparsity()
        dense_full = nll(model(ids)[:, :-1], targets)
        # Decode-like: predictions made at positions half .. T-2 (the sparse ones).
        dense_dec = dense_full[:, half:].mean()
        dense_full = dense_full.mean()
        model.setup_cache(bsz, seqlen)
        model(ids[:, :half], torch.arange(half, device=ids.device))  # dense prefill
        for i, name in enumerate(SELECT_CANDIDATES):
            for j, p in enumerate(grid):
                setting = setting_for(cal, name, p, model)
                if setting.reachable:
                    setting.apply(model, mode="all")
                    # Each pass rewrites cache positions half.. only: the prefix stays dense.
                    dec = nll(model(ids[:, half:], rest)[:, :-1], targets[:, half:])
                    out[0, i, j] = float(dec.mean() - dense_dec)
                    out[1, i, j] = float(nll(model(ids)[:, :-1], targets).mean() - dense_full)
                    model.clear_sparsity()
                bar.update(1)
    finally:
        bar.close()
        model.clear_sparsity()
        model.set_backend(backend)
        for blk, cache in zip(model.layers, saved_cache[0], strict=True):
            blk.attention.kv_cache = cache
        model.cache_len = saved_cache[1]
    return out


def add_tables_from_text(
    model,
    cal: Calibration,
    part: Any,
    *,
    kinds: tuple[str, ...] = tuple(KINDS),
    progress: bool = True,
    log: Callable | None = None,
) -> Calibration:
    """``add_tables`` with tokens read again from the calibration text ``part``: the
    first ``cal.tokens`` (those the histograms saw) and the ones after them, held out."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    n = cal.tokens
    held_n = allocate.HELD_OUT_TOKENS + (SELECT_TOKENS if "select" in kinds else 0)
    stream = part.tokens(model.tokenizer, n + held_n)
    held, disjoint = stream[n:], True
    if held.numel() < allocate.HELD_OUT_WINDOW:
        # Too little text to hold any out: search on the statistics' own last tokens.
        log(
            f"teal: warning: {part.label} has no tokens beyond the {n} calibrated on;"
            " the greedy search reuses calibration tokens"
        )
        held, disjoint = stream[-held_n:], False
    return add_tables(
        model, cal, stream[:n], held, held_out_is_disjoint=disjoint, kinds=kinds, progress=progress
    )


def wi_stats(cal: Calibration) -> ActivationStats:
    return ActivationStats(cal.tables["wi.counts"], int(cal.tables["wi.bin_lo"][0]))


def cats_stats(cal: Calibration) -> ActivationStats:
    from teal.sparsity.scores import cats_stats_from

    return cats_stats_from(cal.tables["cats.counts"], int(cal.tables["cats.bin_lo"][0]))


__all__ = ["KINDS", "NAMES", "add_tables", "add_tables_from_text", "has_tables", "kinds_for"]
