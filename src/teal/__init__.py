"""teal: training-free activation sparsity for faster LLM decoding.

>>> import teal
>>> model = teal.load()                      # the embedded default model
>>> model.generate("The capital of France is", max_new_tokens=16).text
>>> teal.sparsify(model, teal.calibrate(model), sparsity=0.5)   # or a transformers model
"""

from __future__ import annotations

import os

# Before torch loads the OpenMP runtime (libgomp reads this once, at load): a waiting
# thread spins 1,000 times, not 300,000, before it sleeps.  Decode steps are hundreds of
# short parallel regions; on a small machine where other programs also run, long
# spinning starves the thread everyone waits for (2-core box with two busy programs,
# dense bf16: 9.4 tok/s at libgomp's default, 27.9 at 1,000; quiet: 94.3 and 93.6;
# benchmarks/bench_cpu_load.py).  Only a default: a value set by the user wins, and it
# has no effect if torch was imported first.
if not os.environ.get("TEAL_KEEP_OMP_ENV"):
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import torch  # noqa: E402

from teal.api import Sparsity, calibrate, sparsify
from teal.errors import TealError
from teal.model.config import ModelConfig
from teal.model.decoder import Transformer
from teal.sparsity.artifact import Calibration

__all__ = [
    "Calibration",
    "ModelConfig",
    "Sparsity",
    "TealError",
    "Transformer",
    "calibrate",
    "load",
    "sparsify",
]
__version__ = "0.1.0"


def load(
    source: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Load a Llama-family model with its tokenizer.

    ``source``: a Hugging Face folder, a ``.gguf`` file, a Hugging Face model id found
    in the local cache, or None for the embedded default model (SmolLM2-135M-Instruct).
    ``dtype``: fp32, bf16 or fp16 (default fp32 on CPU, bf16 on CUDA).
    """
    from teal.model.build import fingerprint, from_checkpoint, parse_dtype
    from teal.model.loaders import open_checkpoint

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TealError("--device cuda was asked for but no CUDA GPU is visible: use cpu")
    torch_dtype = parse_dtype(dtype, device)
    ckpt = open_checkpoint(source)
    try:
        model = from_checkpoint(ckpt.config, ckpt.get_tensor, dtype=torch_dtype, device=device)
        model.fingerprint = fingerprint(ckpt.config, ckpt.get_tensor)
    finally:
        ckpt.close()
    model.tokenizer = ckpt.tokenizer
    model.source = ckpt.source
    model.eval()
    _pick_backend(model)
    return model


def _pick_backend(model: Transformer) -> None:
    """Sparse decode steps run the fast kernels of the model's device: the CPU gather
    kernel, or the Triton kernels on CUDA.  The plain-torch reference stays available
    through ``model.set_backend("torch")``."""
    if model.device.type == "cuda":
        try:
            model.set_backend("triton")
        except ImportError as exc:
            import warnings

            warnings.warn(
                f"Triton is not importable ({exc}): sparse decode on this GPU runs the slow"
                " plain-torch reference; `pip install triton` for the fast kernels",
                stacklevel=3,
            )
    else:
        model.set_backend("cpu")
