"""Model configuration: one dataclass for the Llama family, read from a Hugging Face
``config.json`` (or the same fields recovered from GGUF metadata), plus named presets
with the real shapes of the large models used for speed work."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from teal.errors import UnsupportedModelError

# Architectures whose decoder is the Llama block (RMSNorm, RoPE, GQA, gated MLP).
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
_HF_ARCH_NAMES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# drelu: ReLU on both gate and up (TurboSparse's dReLU); config.json says "drelu".
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "relu2": "relu2", "drelu": "drelu"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about a checkpoint's shape."""

    arch: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face's ``rope_scaling`` dict (``rope_type`` llama3 or linear), or None.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    act: str = "silu"
    # Per-layer sliding-window size (None: full attention in that layer).
    sliding_windows: tuple[int | None, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHS)} (Llama 2/3, Mistral, Qwen2, SmolLM)"
            )
        if self.act not in _ACTIVATIONS.values():
            raise UnsupportedModelError(
                f"MLP activation {self.act!r} is not supported; supported: silu, relu, relu2, drelu"
            )
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"{self.n_heads} query heads cannot be grouped over {self.n_kv_heads} kv heads"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.n_layers)
        if len(self.sliding_windows) != self.n_layers:
            raise ValueError("sliding_windows needs one entry per layer")

    # Per-projection shapes [in, out], in the order the sparsity code uses everywhere.
    @property
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        return {
            "q": (self.dim, q_out),
            "k": (self.dim, kv_out),
            "v": (self.dim, kv_out),
            "o": (q_out, self.dim),
            "gate": (self.dim, self.ffn_dim),
            "up": (self.dim, self.ffn_dim),
            "down": (self.ffn_dim, self.dim),
        }

    @property
    def projection_params(self) -> int:
        """Weights in the seven projections of all layers."""
        per_layer = sum(k * n for k, n in self.projection_shapes.values())
        return per_layer * self.n_layers

    @property
    def num_params(self) -> int:
        emb = self.vocab_size * self.dim
        norms = self.n_layers * 2 * self.dim + self.dim
        bias = self.n_layers * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        head = 0 if self.tie_embeddings else emb
        return emb + head + norms + self.projection_params + (bias if self.qkv_bias else 0)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2, SmolLM)."""
        arch = cfg.get("model_type")
        if arch is None:
            names = cfg.get("architectures") or []
            arch = next((_HF_ARCH_NAMES[n] for n in names if n in _HF_ARCH_NAMES), None)
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
                " (Llama 2/3, Mistral, Qwen2, SmolLM)"
            )
        act_name = cfg.get("hidden_act", "silu")
        if act_name not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act {act_name!r} is not supported; supported: silu, relu, relu2, drelu"
            )
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        n_layers = int(cfg["num_hidden_layers"])
        head_dim = cfg.get("head_dim") or dim // n_heads
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 layout
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
            elif kind not in ("llama3", "linear"):
                raise UnsupportedModelError(
                    f"rope scaling {kind!r} is not supported; supported: llama3, linear, none"
                )
        windows: list[int | None] = [None] * n_layers
        window = cfg.get("sliding_window")
        if window is not None and arch == "mistral":
            windows = [int(window)] * n_layers
        elif window is not None and arch == "qwen2" and cfg.get("use_sliding_window", False):
            first = int(cfg.get("max_window_layers", n_layers))
            windows = [int(window) if i >= first else None for i in range(n_layers)]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            ffn_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            act=_ACTIVATIONS[act_name],
            sliding_windows=tuple(windows),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict that ``transformers`` reads back as this model."""
        names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
        names["qwen2"] = "Qwen2ForCausalLM"
        windows = {w for w in self.sliding_windows if w is not None}
        cfg: dict[str, Any] = {
            "architectures": [names[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": {"relu2": "relu2"}.get(self.act, self.act),
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if self.eos_token_ids else None,
            "torch_dtype": "float32",
        }
        if self.arch == "llama":
            cfg["attention_bias"] = self.qkv_bias
        if self.arch in ("mistral", "qwen2"):
            cfg["sliding_window"] = windows.pop() if windows else None
        if self.arch == "qwen2":
            cfg["use_sliding_window"] = bool(windows) or any(self.sliding_windows)
            first = next((i for i, w in enumerate(self.sliding_windows) if w), self.n_layers)
            cfg["max_window_layers"] = first
        return cfg


def _preset(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": _preset(
        arch="llama",
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=8192,
        rope_scaling=None,
        bos_token_id=128000,
        eos_token_ids=(128001,),
    ),
    "llama-2-7b": _preset(
        arch="llama",
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        ffn_dim=11008,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=4096,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    "mistral-7b": _preset(
        arch="mistral",
        vocab_size=32768,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        norm_eps=1e-5,
        rope_theta=1000000.0,
        max_seq_len=32768,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    # SmolLM2-135M-Instruct, the embedded default model (shapes from its GGUF metadata).
    "default": _preset(
        arch="llama",
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}


def llama3_inv_freq_scale(inv_freq: list[float], scaling: dict[str, Any]) -> list[float]:
    """Llama-3's frequency-dependent RoPE rescaling: long wavelengths are divided by
    ``factor``, short ones kept, and the band between is interpolated smoothly."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(f)
        elif wavelen > old_ctx / low:
            out.append(f / factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out
