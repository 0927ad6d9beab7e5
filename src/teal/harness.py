"""The lm-evaluation-harness model type ``teal``: lm-eval's own Hugging Face model class
(``HFLM``) with ``teal.sparsify`` applied to the model it loads.

    teal lm-eval --model teal \\
        --model_args pretrained=PATH,calibration=FILE,sparsity=0.5,method=greedy-layers \\
        --tasks TASKS --include_path DIR

``teal lm-eval`` registers the type and hands every argument to lm-eval's command line
(lm-eval 0.4.13 discovers no models through package entry points, so ``lm_eval --model
teal`` alone cannot find it).  ``pretrained`` is a Hugging Face folder (loaded by lm-eval
as usual), a ``.gguf`` file or nothing / ``default`` (the default model): those two are
read by our loader and handed over as a ``transformers`` model with their tokenizer, so
a calibration made by ``teal calibrate`` on the same source fits by fingerprint.

``mode`` defaults to ``all``: log-likelihood tasks score every position in one forward
pass, which ``decode`` (sparse one-token steps only) would leave dense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from teal.errors import TealError
from teal.hf import load_transformers
from teal.sparsity.methods import DEFAULT_METHOD

try:
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - only without the eval extra
    raise TealError(
        f"lm-eval is not installed ({exc}): pip install -e '.[eval]' (or 'teal-sparsity[eval]')"
    ) from None

MODEL_TYPE = "teal"


def _ours(source: Any) -> bool:
    """Sources our loader reads and lm-eval's does not: the default model and GGUF files."""
    return source in (None, "", "default") or str(source).lower().endswith(".gguf")


class TealLM(HFLM):
    """``HFLM`` whose model is sparsified by ``teal.sparsify`` after loading.

    Model arguments beyond HFLM's: ``calibration`` (file from ``teal calibrate``),
    ``sparsity`` (0 = dense, no calibration needed), ``method`` (default
    auto) and ``mode`` (``all`` or ``decode``, default ``all``)."""

    def __init__(
        self,
        pretrained: str | None = None,
        calibration: str | None = None,
        sparsity: float = 0.5,
        method: str = DEFAULT_METHOD,
        mode: str = "all",
        **kwargs: Any,
    ) -> None:
        import teal
        from teal.sparsity.stats import check_sparsity

        sparsity = check_sparsity(float(sparsity))
        if sparsity > 0 and not calibration:
            raise TealError(
                "the teal model type needs calibration=FILE in --model_args (make one with"
                " `teal calibrate --model SOURCE --out FILE`), or sparsity=0 for the dense model"
            )
        if calibration and not Path(str(calibration)).is_file():
            raise TealError(f"calibration file {calibration} does not exist")
        if pretrained is None or (isinstance(pretrained, str) and _ours(pretrained)):
            device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = kwargs.pop("dtype", None)
            model, tokenizer = load_transformers(
                pretrained, dtype=None if dtype in (None, "auto") else dtype, device=device
            )
            kwargs.setdefault("tokenizer", tokenizer)
            pretrained = model
        super().__init__(pretrained=pretrained, **kwargs)
        self.teal = None
        if sparsity > 0:
            self.teal = teal.sparsify(self.model, calibration, sparsity, method, mode=mode)


def register() -> None:
    """Make ``--model teal`` known to lm-eval in this process."""
    from lm_eval.api.registry import model_registry

    if MODEL_TYPE not in model_registry:
        model_registry.register(MODEL_TYPE, target="teal.harness:TealLM")


def main(argv: list[str]) -> int:
    """lm-eval's command line with the ``teal`` model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except ValueError as exc:  # lm-eval's word for bad input: unknown task, bad arguments
        raise TealError(f"lm-eval: {exc}") from exc
    finally:
        sys.argv = saved
    return 0
