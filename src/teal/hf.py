"""Sparsity on a Hugging Face ``transformers`` model, for users who stay in that
ecosystem.

``sparsify(hf_model, thresholds)`` puts a forward pre-hook on the seven projections of
every decoder layer that applies ``x * (|x| > t)`` to their input, the same rule and
the same ``[n_layers, 7]`` threshold table as our model (with per-channel ``scales``,
``|x| * s > t``, and CATS's mask on ``act(gate)``, as ``kernels/reference.py`` defines
them).  It is the plain-torch rule (no fast kernel: the weights stay in
``transformers``' layout); use ``teal.load`` for speed.  A calibration file made with
our model fits the same checkpoint loaded with ``transformers`` and the reverse:
``fingerprint`` computes the same identity.  ``teal.sparsify`` (``teal/api.py``) is the
one call on top: calibration file, method and level in, hooks on.

``load_transformers(source)`` builds a ``transformers`` model from anything ``teal.load``
reads (GGUF files and the default model included) with our loader's weights.

``InputMajorView`` shows a ``transformers`` model as the few attributes of our
``Transformer`` that the sparsity methods read (config, fused input-major weights), so
``teal.sparsity.methods.setting_for`` serves both models unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from teal.errors import TealError, UnsupportedModelError
from teal.kernels.reference import keep_mask
from teal.model.build import fingerprint as _fingerprint
from teal.model.config import ModelConfig
from teal.model.decoder import PROJECTIONS, SITE_PROJECTIONS

# The site (our observer's name) whose input each projection reads.
_SITE_OF = {PROJECTIONS[j]: site for site, js in SITE_PROJECTIONS.items() for j in js}
_CATS_KEY = "mlp_cats"  # as teal.sparsity.scores.CATS_KEY (not imported: no import cycle)
_BASES_ATTR = "_teal_value_bases"  # the value rotation a transformers model carries

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


class _Proj:
    """One fused input-major weight, made on first use (a copy of one layer's weights)."""

    def __init__(self, layer: nn.Module, paths: tuple[str, ...]) -> None:
        self._layer, self._paths, self._wt = layer, paths, None

    def get(self) -> Tensor:
        if self._wt is None:
            w = torch.cat([self._layer.get_submodule(p).weight.detach() for p in self._paths])
            # Contiguous [in, out] like our buffers, so reductions over it (weight norms)
            # run in the same order and give the same bits.
            self._wt = w.t().contiguous()
        return self._wt


class _AttnView:
    def __init__(self, layer: nn.Module) -> None:
        self._qkv = _Proj(layer, tuple(_PATHS[p] for p in ("q", "k", "v")))
        self._o = _Proj(layer, (_PATHS["o"],))

    wqkv = property(lambda self: self._qkv.get())
    wo = property(lambda self: self._o.get())


class _MLPView:
    def __init__(self, layer: nn.Module) -> None:
        self._gate_up = _Proj(layer, (_PATHS["gate"], _PATHS["up"]))
        self._down = _Proj(layer, (_PATHS["down"],))

    w_gate_up = property(lambda self: self._gate_up.get())
    w_down = property(lambda self: self._down.get())


class _BlockView:
    def __init__(self, layer: nn.Module) -> None:
        self.attention, self.mlp = _AttnView(layer), _MLPView(layer)


class InputMajorView:
    """What ``setting_for`` and the score functions read of our ``Transformer``
    (``config``, ``device``, ``fingerprint``, ``source`` and per layer ``wqkv``, ``wo``,
    ``w_gate_up``, ``w_down``), taken from a ``transformers`` model.  Weights are fused
    and transposed one layer at a time, when read."""

    def __init__(self, hf_model: nn.Module) -> None:
        self.config = config_of(hf_model)
        self._hf = hf_model
        self.layers = [_BlockView(layer) for layer in _layers(hf_model)]
        self.device = next(hf_model.parameters()).device
        self.fingerprint = fingerprint(hf_model)
        self.source = getattr(hf_model, "name_or_path", None) or type(hf_model).__name__

    # The value basis (``teal.model.rotate``) lives on the transformers model itself: a
    # view is made per call, the weights it describes stay rotated.
    value_bases = property(
        lambda self: getattr(self._hf, _BASES_ATTR, None),
        lambda self, v: setattr(self._hf, _BASES_ATTR, v),
    )

    @torch.no_grad()
    def fold_values(self, delta: Tensor) -> None:
        """``teal.model.rotate.fold`` on the transformers weights ([out, in]): v_proj's
        rows of KV head ``g`` become ``delta^T`` times them, o_proj's columns of ``g``'s
        query heads times ``delta``."""
        cfg = self.config
        hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
        for i, layer in enumerate(_layers(self._hf)):
            v, o = layer.get_submodule(_PATHS["v"]), layer.get_submodule(_PATHS["o"])
            for g in range(cfg.n_kv_heads):
                q = delta[i, g].to(v.weight.device, torch.float64)
                rows = slice(g * hd, (g + 1) * hd)
                v.weight[rows] = (q.T @ v.weight[rows].double()).to(v.weight.dtype)
                if v.bias is not None:
                    v.bias[rows] = (v.bias[rows].double() @ q).to(v.bias.dtype)
                for h in range(g * group, (g + 1) * group):
                    cols = slice(h * hd, (h + 1) * hd)
                    o.weight[:, cols] = (o.weight[:, cols].double() @ q).to(o.weight.dtype)
        self.layers = [_BlockView(layer) for layer in _layers(self._hf)]  # fused copies anew


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


def sparsify(
    hf_model: nn.Module,
    thresholds: Tensor,
    *,
    mode: str = "decode",
    scales: list[dict[str, Tensor]] | None = None,
) -> SparsityHandle:
    """Sparsify the inputs of the seven projections of every layer.

    ``thresholds``: ``[n_layers, 7]`` (q, k, v, o, gate, up, down), e.g.
    ``Calibration.load(path).thresholds(0.5)``.  ``mode="decode"`` touches one-token steps
    only (prefill stays dense, as in the method); ``"all"`` every position.  ``scales``:
    per layer, per site (attn_in, attn_out, mlp_in, mlp_mid) channel scales of the score
    ``|x| * s``, or CATS's marker, as ``model.set_sparsity`` takes them (``Setting.scales``
    of ``teal.sparsity.methods``); ``teal.sparsify`` fills all of this in.
    """
    if mode not in ("decode", "all"):
        raise ValueError(f"mode must be 'decode' or 'all', not {mode!r}")
    layers = _layers(hf_model)
    if tuple(thresholds.shape) != (len(layers), len(PROJECTIONS)):
        raise ValueError(
            f"thresholds must have shape {(len(layers), len(PROJECTIONS))} for this model,"
            f" got {tuple(thresholds.shape)}"
        )
    if scales is not None and len(scales) != len(layers):
        raise ValueError(f"scales must have one entry per layer ({len(layers)}), got {len(scales)}")
    handle = SparsityHandle()
    for i, layer in enumerate(layers):
        layer_scales = scales[i] if scales is not None else {}
        cats = _CATS_KEY in layer_scales
        for j, name in enumerate(PROJECTIONS):
            module = layer.get_submodule(_PATHS[name])
            device = module.weight.device
            if cats and name in ("gate", "up"):
                continue  # CATS reads gate and up dense (as kernels.dispatch does)
            t = thresholds[i, j].to(device, torch.float32)
            s = layer_scales.get(_SITE_OF[name])
            s = None if s is None else s.to(device)
            handle.hooks.append(module.register_forward_pre_hook(_make_hook(t, s, mode)))
        if cats:
            act = layer.get_submodule("mlp.act_fn")
            if any(act is other.get_submodule("mlp.act_fn") for other in layers[:i]):
                handle.remove()
                raise UnsupportedModelError(
                    "this model shares one activation module between layers, which CATS's"
                    " per-layer hook cannot tell apart: use another method"
                )
            t = thresholds[i, 4].to(layer.get_submodule(_PATHS["gate"]).weight.device)
            handle.hooks.append(act.register_forward_hook(_make_cats_hook(t, mode)))
    return handle


def _make_hook(t: Tensor, scale: Tensor | None, mode: str):
    def hook(_module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if mode == "decode" and x.shape[-2] != 1:
            return None
        # The reference rule, compared as our model compares: in x's dtype against a
        # 0-dim fp32 threshold.
        keep = keep_mask(x, t, scale)
        return (torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)),) + args[1:]

    return hook


def _make_cats_hook(t: Tensor, mode: str):
    """On ``act_fn``'s output: CATS keeps ``act(gate)`` where ``|act(gate)| > t``; the
    zeros then pass through ``* up`` to the down projection's input."""

    def hook(_module: nn.Module, _args: tuple, a: Tensor) -> Tensor | None:
        if mode == "decode" and a.shape[-2] != 1:
            return None
        return torch.where(a.abs() > t, a, torch.zeros((), dtype=a.dtype, device=a.device))

    return hook


def load_transformers(
    source: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """A ``transformers`` causal LM and its tokenizer for anything ``teal.load`` reads
    (the default model, a GGUF file, an HF folder), with our loader's weights: the
    fingerprint is the same as ``teal.load``'s, so our calibration files fit."""
    import transformers

    import teal
    from teal.model.build import hf_state_dict

    ours = teal.load(None if source in ("", "default") else source, dtype=dtype, device="cpu")
    cfg = transformers.AutoConfig.for_model(**ours.config.to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(cfg).to(ours.dtype)
    state = {k: v.contiguous() for k, v in hf_state_dict(ours)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if ours.config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise TealError(
            f"cannot map {ours.source} onto transformers' {type(hf).__name__}: missing"
            f" {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    hf.tie_weights()
    hf.name_or_path = hf.config._name_or_path = str(ours.source)
    tokenizer = ours.tokenizer
    del ours, state
    return hf.to(device).eval(), tokenizer
