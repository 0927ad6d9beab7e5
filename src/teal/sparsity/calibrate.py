"""Calibrate a model on text: statistics plus the metadata that ties them to the model
and the text, and the cache that ``teal eval`` and ``teal generate`` fall back on."""

from __future__ import annotations

import datetime as _dt
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from teal.errors import CalibrationMismatchError
from teal.sparsity.artifact import STATS_METHOD, STATS_VERSION, Calibration
from teal.sparsity.stats import collect_stats

DEFAULT_TOKENS = 16384
DEFAULT_SEQ_LEN = 2048
# Fit a rotation of each KV head's values (``teal.model.rotate``) before the statistics,
# unless told not to: free per token, and it makes o_proj's input sparser at less loss.
ROTATE_VALUES = True


def _tokens_sha256(ids: Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def calibrate(
    model: torch.nn.Module,
    token_ids: Tensor,
    *,
    text: dict[str, Any] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    progress: bool = True,
    bos: int | None = None,
    rotate: bool | None = None,
    lowrank: int = 0,
) -> Calibration:
    """Statistics of ``model`` on ``token_ids`` (a 1-D stream or ``[n, T]`` windows)
    with the metadata the artifact needs; ``text`` describes where the tokens came from
    (``TextPart.identity()``); ``bos`` leads every window (as in evaluation).

    ``rotate`` (default ``ROTATE_VALUES``): first put ``model`` in the principal axes of
    its attention outputs on the first tokens (``teal.model.rotate``, in place; the dense
    model computes the same function); False: in the checkpoint's own basis.  The
    calibration records the basis, and a model it is bound to is put in it.

    ``lowrank`` (default 0: off): split each MLP input into its top-``lowrank``
    principal subspace, run dense, and a sparsified remainder (``teal.model.lowrank``);
    the split is fitted on the first tokens, set on ``model`` and stored likewise."""
    from teal.model import lowrank as lr
    from teal.model import rotate as rot

    start = time.perf_counter()
    seq_len = min(seq_len, model.config.max_seq_len)
    rotation = None
    if ROTATE_VALUES if rotate is None else rotate:
        rot.fit_and_rotate(model, token_ids, seq_len, bos)
        rotation = {
            "basis": "principal-axes",
            "fit_tokens": min(rot.FIT_TOKENS, int(token_ids.numel())),
            "seconds": round(time.perf_counter() - start, 2),
        }
    else:
        rot.set_value_bases(model, None)
    split = None
    if lowrank:
        t0 = time.perf_counter()
        lr.fit_lowrank(model, token_ids, seq_len, int(lowrank), bos)
        split = {
            "site": "mlp_in",
            "rank": int(lowrank),
            "fit_tokens": min(lr.FIT_TOKENS, int(token_ids.numel())),
            "overhead": lr.overhead_share(model.config, int(lowrank)),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    else:
        lr.set_lowrank(model, None)
    stats = collect_stats(
        model, token_ids, seq_len=seq_len, batch_size=batch_size, progress=progress, bos=bos
    )
    seconds = time.perf_counter() - start
    import teal

    text = dict(text or {"name": "tokens"})
    text["tokens_sha256"] = _tokens_sha256(token_ids)
    meta = {
        "model_fingerprint": getattr(model, "fingerprint", None),
        "model_source": getattr(model, "source", None),
        "model_arch": model.config.arch,
        "n_layers": model.config.n_layers,
        "text": text,
        "tokens": int(token_ids.numel()),
        "seq_len": int(token_ids.shape[-1]) if token_ids.dim() == 2 else int(seq_len),
        "bos": bos,
        "dtype": str(model.dtype).replace("torch.", ""),
        "method": STATS_METHOD,
        "version": STATS_VERSION,
        "teal_version": teal.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
    }
    cal = Calibration(stats, meta)
    if rotation is not None:
        cal.tables[rot.TABLE] = model.value_bases.clone()
        meta["value_rotation"] = rotation
    if split is not None:
        cal.tables[lr.TABLE] = model.lowrank_bases.clone()
        meta["lowrank"] = split
    return cal


def calibrate_text(
    model: torch.nn.Module,
    part: Any,
    *,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    progress: bool = True,
    rotate: bool | None = None,
    lowrank: int = 0,
) -> Calibration:
    """Calibrate on the first ``tokens`` tokens of a ``TextPart`` (its calibration side)."""
    from teal.eval.corpus import bos_token

    if tokens < 1:
        raise ValueError("tokens must be positive")
    stream = part.tokens(model.tokenizer, tokens)
    bos = bos_token(model.tokenizer)
    cal = calibrate(
        model,
        stream,
        text=part.identity(),
        seq_len=seq_len,
        batch_size=batch_size,
        progress=progress,
        bos=bos,
        rotate=rotate,
        lowrank=lowrank,
    )
    return cal


def default_path(model: torch.nn.Module, part: Any) -> Path:
    """Where the calibration of this model on this text is cached: keyed by the model
    fingerprint and the text's hash, so another model or text never picks it up."""
    from teal.data.packages import cache_dir

    fp = getattr(model, "fingerprint", None) or "unknown-model"
    key = hashlib.sha256(f"{part.sha256}:{part.part}".encode()).hexdigest()[:12]
    return cache_dir() / "calibration" / f"{fp}-{part.name.replace('/', '_')}-{key}.safetensors"


def cached_or_new(
    model: torch.nn.Module,
    part: Any,
    *,
    tokens: int = DEFAULT_TOKENS,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[Calibration, Path]:
    """The cached calibration of ``model`` on ``part``, made (and cached) first if there
    is none or it is unreadable or stale; ``log`` is told which."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = default_path(model, part)
    if path.is_file():
        try:
            cal = Calibration.load(path, model)
            if (
                cal.metadata.get("method") == STATS_METHOD
                and cal.metadata.get("version") == STATS_VERSION
            ):
                log(f"teal: using cached calibration {path} ({cal.tokens} tokens)")
                return cal, path
            log(f"teal: cached calibration {path} is from an older teal; recalibrating")
        except CalibrationMismatchError as exc:
            log(f"teal: cached calibration unusable ({exc}); recalibrating")
    log(f"teal: calibrating on {tokens} tokens of {part.label}; will cache it at {path}")
    cal = calibrate_text(model, part, tokens=tokens, progress=progress)
    try:
        cal.save(path)
    except OSError as exc:  # a read-only cache costs a recalibration next time, nothing more
        log(f"teal: warning: could not cache the calibration at {path} ({exc})")
    return cal, path
