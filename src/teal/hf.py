"""Sparsity on a Hugging Face ``transformers`` model, for users who stay in that
ecosystem.

``sparsify(hf_model, thresholds)`` puts a forward pre-hook on the seven projections of
every decoder layer that applies ``x * (|x| > t)`` to their input, the same rule and
the same ``[n_layers, 7]`` threshold table as our model.  It is the plain-torch rule
(no fast kernel: the weights stay in ``transformers``' layout); use ``teal.load`` for
speed.  A calibration file made with our model fits the same checkpoint loaded with
``transformers`` and the reverse: ``fingerprint`` computes the same identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from teal.errors import UnsupportedModelError
from teal.model.build import fingerprint as _fingerprint
from teal.model.config import ModelConfig
from teal.model.decoder import PROJECTIONS

# Attribute paths of the seven projections inside a Llama-family decoder layer.
_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass
class SparsityHandle:
    """Returned by ``sparsify``; ``remove()`` restores the dense model."""

    hooks: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def _layers(hf_model: nn.Module) -> nn.ModuleList:
    inner = getattr(hf_model, "model", hf_model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(hf_model).__name__} has no decoder layers at .model.layers: only"
            " Llama-family models (Llama, Mistral, Qwen2, SmolLM) are supported"
        )
    return layers


def config_of(hf_model: nn.Module) -> ModelConfig:
    return ModelConfig.from_hf(hf_model.config.to_dict())


def fingerprint(hf_model: nn.Module) -> str:
    """The model identity that calibration files record (same as ``teal.load``'s)."""
    state = hf_model.state_dict()
    return _fingerprint(config_of(hf_model), state.__getitem__)


def sparsify(hf_model: nn.Module, thresholds: Tensor, *, mode: str = "decode") -> SparsityHandle:
    """Sparsify the inputs of the seven projections of every layer.

    ``thresholds``: ``[n_layers, 7]`` (q, k, v, o, gate, up, down), e.g.
    ``Calibration.load(path).thresholds(0.5)``.  ``mode="decode"`` touches one-token steps
    only (prefill stays dense, as in the method); ``"all"`` every position.
    """
    if mode not in ("decode", "all"):
        raise ValueError(f"mode must be 'decode' or 'all', not {mode!r}")
    layers = _layers(hf_model)
    if tuple(thresholds.shape) != (len(layers), len(PROJECTIONS)):
        raise ValueError(
            f"thresholds must have shape {(len(layers), len(PROJECTIONS))} for this model,"
            f" got {tuple(thresholds.shape)}"
        )
    handle = SparsityHandle()
    for i, layer in enumerate(layers):
        for j, name in enumerate(PROJECTIONS):
            module = layer.get_submodule(_PATHS[name])
            t = thresholds[i, j].to(module.weight.device, torch.float32)
            handle.hooks.append(module.register_forward_pre_hook(_make_hook(t, mode)))
    return handle


def _make_hook(t: Tensor, mode: str):
    def hook(_module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if mode == "decode" and x.shape[-2] != 1:
            return None
        # Compared as our model compares: in x's dtype against a 0-dim threshold.
        keep = x.abs() > t
        return (torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)),) + args[1:]

    return hook
