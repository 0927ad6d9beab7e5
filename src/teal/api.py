"""The two calls for a model someone already holds: ``sparsify`` (a calibration, a
method and a level in; the model sparse in place, the way torchao's ``quantize_``
rewrites one) and ``calibrate`` (text in; the artifact ``teal calibrate`` writes).

Both take our ``Transformer`` (``teal.load``) or a ``transformers`` causal LM of the
Llama family.  The thresholds and scales always come from
``teal.sparsity.methods.setting_for``; on a ``transformers`` model they become
pre-hooks (``teal.hf``), on ours ``model.set_sparsity``, so the two agree by
construction (``tests/test_hf_adapter.py`` checks the logits).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from teal.errors import TealError
from teal.model.decoder import Transformer
from teal.sparsity.artifact import Calibration
from teal.sparsity.calibrate import DEFAULT_SEQ_LEN, DEFAULT_TOKENS
from teal.sparsity.methods import DEFAULT_METHOD

# The attribute a sparsified ``transformers`` model keeps its hooks under, so that a
# second ``sparsify`` replaces the first rather than stacking on it.
_HANDLE_ATTR = "_teal_sparsity"


@dataclass
class Sparsity:
    """What ``sparsify`` applied; ``remove()`` makes the model dense again."""

    method: str
    sparsity: float
    mode: str
    thresholds: Tensor = field(repr=False)  # [n_layers, 7]: q, k, v, o, gate, up, down
    max_sparsity: float = 1.0
    _model: Any = field(default=None, repr=False)
    _handle: Any = field(default=None, repr=False)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            if getattr(self._model, _HANDLE_ATTR, None) is self._handle:
                delattr(self._model, _HANDLE_ATTR)
        elif self._model is not None:
            self._model.clear_sparsity()


def _load_calibration(calibration: str | os.PathLike | Calibration, model: Any) -> Calibration:
    if isinstance(calibration, Calibration):
        calibration.bind(model)
        return calibration
    if isinstance(calibration, (str, os.PathLike)):
        return Calibration.load(calibration, model)
    raise TealError(
        f"calibration must be a calibration file path or a Calibration, not"
        f" {type(calibration).__name__}: make one with teal.calibrate(model, text)"
    )


def sparsify(
    model: nn.Module,
    calibration: str | os.PathLike | Calibration,
    sparsity: float = 0.5,
    method: str = DEFAULT_METHOD,
    *,
    mode: str = "decode",
) -> Sparsity:
    """Make ``model`` sparse in place at weight-weighted ``sparsity`` with ``method``.

    ``model``: our ``Transformer`` or a ``transformers`` Llama-family causal LM.
    ``calibration``: a file from ``teal calibrate`` / ``teal.calibrate`` or a loaded
    ``Calibration``; it must have been made on the same weights (checked by fingerprint).
    ``mode="decode"`` sparsifies one-token steps only (dense prefill, as in the method);
    ``"all"`` every position (what a one-pass log-likelihood evaluation needs to see any
    effect).  Calling it again replaces the previous setting.
    """
    from teal.sparsity.methods import setting_for

    if mode not in ("decode", "all"):
        raise TealError(f"mode must be 'decode' or 'all', not {mode!r}")
    if isinstance(model, Transformer):
        view: Any = model
    else:
        from teal.hf import InputMajorView

        view = InputMajorView(model)
    cal = _load_calibration(calibration, view)
    setting = setting_for(cal, method, sparsity, view, mode=mode)
    if not setting.reachable:
        raise TealError(
            f"method {method!r} reaches at most {setting.max_sparsity:.1%} sparsity on this"
            f" model, not {setting.sparsity:.0%}: ask for less or use another method"
        )
    out = Sparsity(method, setting.sparsity, mode, setting.thresholds, setting.max_sparsity, model)
    if isinstance(model, Transformer):
        setting.apply(model, mode=mode)
        return out
    from teal import hf

    old = getattr(model, _HANDLE_ATTR, None)
    if old is not None:
        old.remove()
    out._handle = hf.sparsify(model, setting.thresholds, mode=mode, scales=setting.scales)
    setattr(model, _HANDLE_ATTR, out._handle)
    return out


# ----------------------------------------------------------------------------- calibrate


def _text_part(text: str | os.PathLike | Sequence[str] | None) -> Any:
    """The calibration side of ``text``: None (the default Wikipedia leads) or a file is
    split exactly as ``teal calibrate --text`` splits it; a list of strings is used whole
    (the caller chose them as calibration text)."""
    from teal.eval.corpus import TextPart, load_corpus

    if isinstance(text, TextPart):
        return text
    if text is None or isinstance(text, (str, os.PathLike)):
        return load_corpus(text).part("calibration")
    docs = tuple(str(t).strip() for t in text if str(t).strip())
    if not docs:
        raise TealError("calibration text is empty: give a few thousand tokens of text")
    digest = hashlib.sha256("\0".join(docs).encode("utf-8")).hexdigest()
    return TextPart("texts", f"{len(docs)} texts given in Python", digest, "calibration", docs)


def _tokenizer_of(hf_model: nn.Module) -> Any:
    from teal.model.tokenizer import tokenizer_from_hf_folder

    where = getattr(hf_model, "name_or_path", None) or ""
    tok = tokenizer_from_hf_folder(where) if where and Path(where).is_dir() else None
    if tok is None:
        raise TealError(
            f"cannot find the tokenizer of this model (name_or_path {where!r} is not a local"
            " folder with tokenizer files): pass tokenizer=AutoTokenizer.from_pretrained(...)"
        )
    return tok


def as_teal_model(hf_model: nn.Module, tokenizer: Any = None) -> Transformer:
    """Our ``Transformer`` with the weights of a ``transformers`` model (copied: it
    needs memory for a second copy of the weights), its fingerprint and tokenizer."""
    from teal.hf import InputMajorView, config_of, fingerprint
    from teal.model.build import from_checkpoint, parse_dtype

    param = next(hf_model.parameters())
    dtype = parse_dtype(param.dtype, param.device)
    state = hf_model.state_dict()
    cfg = config_of(hf_model)
    model = from_checkpoint(cfg, state.__getitem__, dtype=dtype, device=param.device)
    model.fingerprint = fingerprint(hf_model)
    model.value_bases = InputMajorView(hf_model).value_bases  # its weights' value basis
    model.source = getattr(hf_model, "name_or_path", None) or type(hf_model).__name__
    model.tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(hf_model)
    return model.eval()


def calibrate(
    model: nn.Module,
    text: str | os.PathLike | Sequence[str] | None = None,
    *,
    tokenizer: Any = None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    methods: Sequence[str] = (DEFAULT_METHOD,),
    out: str | os.PathLike | None = None,
    progress: bool = True,
    rotate: bool | None = None,
    lowrank: int = 0,
) -> Calibration:
    """Activation statistics of ``model`` on ``text`` plus the tables ``methods`` need:
    the artifact ``teal calibrate`` writes, for our model or a ``transformers`` one.

    ``text``: None (the default Wikipedia leads, calibration part), a plain-text or JSONL
    file (its calibration part, as the CLI takes it) or a list of strings (all of them).
    ``tokenizer``: for a ``transformers`` model, read from its folder when not given.
    ``out``: also save it there (atomically).  A ``transformers`` model is copied into our
    layout for the passes (one more copy of the weights while it runs).
    ``rotate``: fit a rotation of the value heads first (``teal.model.rotate``; default
    ``ROTATE_VALUES``); our model is put in it now, a ``transformers`` one by ``sparsify``.
    ``lowrank``: split each MLP input into a dense rank-``lowrank`` part and a sparse
    remainder (``teal.model.lowrank``; 0, the default: no split).  Our model only.
    """
    from teal.sparsity.calibrate import calibrate_text
    from teal.sparsity.methods import check_method
    from teal.sparsity.tables import add_tables_from_text, kinds_for

    for m in methods:
        check_method(m)
    if int(tokens) < 1:
        raise TealError(f"tokens must be positive, got {tokens}")
    if int(lowrank) < 0:
        raise TealError(f"lowrank must be 0 (off) or a positive rank, got {lowrank}")
    if lowrank and not isinstance(model, Transformer):
        raise TealError(
            "the low-rank split (lowrank=) runs on teal's own model only: load the"
            " checkpoint with teal.load"
        )
    ours = model if isinstance(model, Transformer) else as_teal_model(model, tokenizer)
    if tokenizer is not None and ours is model:
        ours.tokenizer = tokenizer
    part = _text_part(text)
    cal = calibrate_text(
        ours, part, tokens=int(tokens), seq_len=seq_len, batch_size=batch_size,
        progress=progress, rotate=rotate, lowrank=int(lowrank),
    )  # fmt: skip
    kinds = kinds_for(methods)
    if kinds:
        add_tables_from_text(ours, cal, part, kinds=kinds, progress=progress)
    if out is not None:
        cal.save(out)
    return cal
