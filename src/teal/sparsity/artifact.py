"""The calibration artifact: one safetensors file holding the activation histograms
(and, later, allocation tables) with JSON metadata saying which model and which text
they describe.  Written atomically; read back only against the model it was made for.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from teal.errors import CalibrationMismatchError, TealError
from teal.sparsity.stats import ActivationStats

FORMAT = "teal-calibration"
FORMAT_VERSION = 1
# Bumped when the way statistics are gathered changes (bins, sites, what is observed).
STATS_METHOD = "abs-histogram-f32bits-256-per-octave"
STATS_VERSION = 2  # 2: attn-out statistics in the calibration's value basis (teal.model.rotate)
_META_KEY = "teal"
_STATS_PREFIX = "stats."


def _digest(tensors: dict[str, Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes: a flipped bit in the
    counts would otherwise pass as a valid (and silently wrong) calibration."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Calibration:
    """Statistics of one model on one text, plus what identifies both.

    ``metadata`` holds at least ``model_fingerprint``, ``model_source``, ``text`` (a
    dict: ``name``, ``sha256``, ...), ``tokens``, ``method`` and ``version``.  ``tables``
    carries further named tensors (allocation tables) through save and load.
    """

    stats: ActivationStats
    metadata: dict[str, Any]
    tables: dict[str, Tensor] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get("model_fingerprint")

    @property
    def tokens(self) -> int:
        return int(self.metadata.get("tokens", 0))

    def thresholds(self, sparsity: float | Tensor) -> Tensor:
        return self.stats.thresholds(sparsity)

    def check_model(self, model: torch.nn.Module, path: str | os.PathLike | None = None) -> None:
        """Raise ``CalibrationMismatchError`` unless this was calibrated on ``model``."""
        where = f" {path}" if path else ""
        ours, theirs = getattr(model, "fingerprint", None), self.fingerprint
        if ours is not None and theirs != ours:
            made = self.metadata.get("model_source") or "another model"
            raise CalibrationMismatchError(
                f"calibration file{where} was made for model {made} (fingerprint {theirs}),"
                f" not {getattr(model, 'source', None) or 'this model'} (fingerprint {ours}):"
                " recalibrate with `teal calibrate --model ...` for this model"
            )
        if self.stats.n_layers != model.config.n_layers:
            raise CalibrationMismatchError(
                f"calibration file{where} has {self.stats.n_layers} layers, the model"
                f" {model.config.n_layers}: recalibrate with `teal calibrate`"
            )

    @property
    def value_bases(self) -> Tensor | None:
        """The value basis the statistics were gathered in (``teal.model.rotate``)."""
        from teal.model.rotate import TABLE

        return self.tables.get(TABLE)

    @property
    def lowrank_bases(self) -> Tensor | None:
        """The split of the MLP input the mlp-in statistics describe (``teal.model.lowrank``)."""
        from teal.model.lowrank import TABLE

        return self.tables.get(TABLE)

    @property
    def lowrank_overhead(self) -> float:
        """Weights the split's dense term adds, as a share of the projections' (0: none)."""
        if self.lowrank_bases is None:
            return 0.0
        return float(self.metadata["lowrank"]["overhead"])

    def bind(self, model: torch.nn.Module, path: str | os.PathLike | None = None) -> None:
        """``check_model``, then put ``model`` in this calibration's value basis (a
        rotation folded into wv and o_proj: the dense function is unchanged) and give it
        this calibration's split of the MLP input, so that its attn-out and mlp-in
        inputs are what these statistics describe."""
        from teal.model.lowrank import set_lowrank
        from teal.model.rotate import set_value_bases

        self.check_model(model, path)
        set_value_bases(model, self.value_bases)
        set_lowrank(model, self.lowrank_bases)

    # ----- files -----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then ``os.replace``,
        so an interrupted save never leaves a partial file under ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {_STATS_PREFIX + k: v.contiguous() for k, v in self.stats.to_tensors().items()}
        for name, t in self.tables.items():
            if name.startswith(_STATS_PREFIX):
                raise ValueError(f"table names may not start with {_STATS_PREFIX!r}")
            tensors[name] = t.detach().cpu().contiguous()
        meta = dict(self.metadata)
        meta.setdefault("format", FORMAT)
        meta.setdefault("format_version", FORMAT_VERSION)
        meta["tensors_sha256"] = _digest(tensors)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> Calibration:
        """Read a calibration file; with ``model``, also check that it belongs to it and
        put it in the calibration's value basis (``bind``)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise TealError(
                f"calibration file {path} does not exist: make one with"
                f" `teal calibrate --out {path}`"
            )
        unreadable = (
            f"{path} is not a readable teal calibration file"
            " (truncated or not made by `teal calibrate`): delete it and recalibrate"
        )
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = json.loads(raw) if raw else None
        except Exception as exc:  # safetensors raises several types for a bad file
            raise CalibrationMismatchError(f"{unreadable}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CalibrationMismatchError(unreadable)
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise CalibrationMismatchError(
                f"{path} was written by a newer teal (format {meta['format_version']}):"
                " upgrade teal or recalibrate"
            )
        if meta.get("tensors_sha256") != _digest(tensors):
            raise CalibrationMismatchError(f"{unreadable}: its contents fail their checksum")
        stats_t = {
            k[len(_STATS_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_STATS_PREFIX)
        }
        try:
            stats = ActivationStats.from_tensors(stats_t)
        except (KeyError, ValueError, IndexError) as exc:
            raise CalibrationMismatchError(f"{unreadable}: {exc}") from None
        tables = {k: v for k, v in tensors.items() if not k.startswith(_STATS_PREFIX)}
        cal = cls(stats, meta, tables)
        if model is not None:
            cal.bind(model, path)
        return cal
