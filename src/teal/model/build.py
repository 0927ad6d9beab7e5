"""Turn a checkpoint (Hugging Face naming) into our ``Transformer``, and back.

Weights are copied tensor by tensor from the (memory-mapped) checkpoint into
preallocated parameters, so loading holds one model plus one tensor in transit,
never two models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from teal.errors import CorruptCheckpointError, UnsupportedModelError
from teal.model.config import ModelConfig
from teal.model.decoder import Transformer

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None`` means fp32 on CPU and bf16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return dtype
        raise UnsupportedModelError(f"dtype {dtype} is not supported: use fp32, bf16 or fp16")
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise UnsupportedModelError(
            f"dtype {dtype!r} is not supported: use fp32, bf16 or fp16"
        ) from None


def _hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "attn_norm": p + "input_layernorm.weight",
        "ffn_norm": p + "post_attention_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "bq": p + "self_attn.q_proj.bias",
        "bk": p + "self_attn.k_proj.bias",
        "bv": p + "self_attn.v_proj.bias",
        "o": p + "self_attn.o_proj.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


def _check(name: str, t: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(t.shape) != shape:
        raise CorruptCheckpointError(
            f"tensor {name} has shape {tuple(t.shape)} but the config implies {shape}:"
            " the checkpoint and its config.json do not belong together"
        )
    return t


def from_checkpoint(
    config: ModelConfig,
    get_tensor: Callable[[str], Tensor],
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Build the model from a tensor getter in Hugging Face naming and layout."""
    cfg = config
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.requires_grad_(False)
    model.reset_buffers()

    def put(dst: Tensor, src: Tensor) -> None:
        dst.copy_(src.to(dtype))

    def fetch(name: str, shape: tuple[int, ...]) -> Tensor:
        return _check(name, get_tensor(name), shape)

    d, hd = cfg.dim, cfg.head_dim
    nq, nkv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    with torch.no_grad():
        put(model.tok_embeddings.weight, fetch("model.embed_tokens.weight", (cfg.vocab_size, d)))
        put(model.norm.weight, fetch("model.norm.weight", (d,)))
        if model.lm_head is not None:
            put(model.lm_head, fetch("lm_head.weight", (cfg.vocab_size, d)))
        for i, block in enumerate(model.layers):
            n = _hf_layer_names(i)
            put(block.attention_norm.weight, fetch(n["attn_norm"], (d,)))
            put(block.ffn_norm.weight, fetch(n["ffn_norm"], (d,)))
            att = block.attention
            # Fused and transposed: [in, q|k|v] and [in, gate|up].
            for col, key, width in ((0, "q", nq), (nq, "k", nkv), (nq + nkv, "v", nkv)):
                put(att.wqkv[:, col : col + width], fetch(n[key], (width, d)).t())
                if att.bqkv is not None:
                    put(att.bqkv[col : col + width], fetch(n["b" + key], (width,)))
            put(att.wo, fetch(n["o"], (d, nq)).t())
            mlp = block.mlp
            f = cfg.ffn_dim
            put(mlp.w_gate_up[:, :f], fetch(n["gate"], (f, d)).t())
            put(mlp.w_gate_up[:, f:], fetch(n["up"], (f, d)).t())
            put(mlp.w_down, fetch(n["down"], (d, f)).t())
    return model


def random_model(
    config: ModelConfig, *, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0
) -> Transformer:
    """Random weights with the real shapes (speed work, tests). Values ~ N(0, 0.02)
    with unit norms, which gives activations of a realistic spread."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    model.requires_grad_(False)
    model.reset_buffers()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.fingerprint = model_fingerprint(model)
    model.source = f"random:{seed}"
    return model


def hf_state_dict(model: Transformer) -> Iterator[tuple[str, Tensor]]:
    """Our parameters in Hugging Face naming and layout (fp32 views are not made:
    tensors keep the model's dtype)."""
    cfg = model.config
    nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    yield "model.embed_tokens.weight", model.tok_embeddings.weight
    yield "model.norm.weight", model.norm.weight
    if model.lm_head is not None:
        yield "lm_head.weight", model.lm_head
    for i, block in enumerate(model.layers):
        n = _hf_layer_names(i)
        att, mlp = block.attention, block.mlp
        yield n["attn_norm"], block.attention_norm.weight
        yield n["ffn_norm"], block.ffn_norm.weight
        for col, key, width in ((0, "q", nq), (nq, "k", nkv), (nq + nkv, "v", nkv)):
            yield n[key], att.wqkv[:, col : col + width].t()
            if att.bqkv is not None:
                yield n["b" + key], att.bqkv[col : col + width]
        yield n["o"], att.wo.t()
        yield n["gate"], mlp.w_gate_up[:, : cfg.ffn_dim].t()
        yield n["up"], mlp.w_gate_up[:, cfg.ffn_dim :].t()
        yield n["down"], mlp.w_down.t()


def fingerprint(config: ModelConfig, get_tensor: Callable[[str], Tensor]) -> str:
    """Model identity: architecture, shapes and the fp32 values of fixed slices of a
    few tensors in Hugging Face layout.  Two loads of the same checkpoint agree whatever
    dtype or loader they use; a different checkpoint does not."""
    h = hashlib.sha256()
    h.update(json.dumps(config.to_hf(), sort_keys=True).encode())
    last = config.n_layers - 1
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        "model.norm.weight",
    ]
    for name in names:
        t = get_tensor(name)
        rows = t[:8] if t.dim() > 1 else t
        h.update(name.encode())
        h.update(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: Transformer) -> str:
    """The fingerprint computed from a built model (random-weight models, tests)."""
    params = dict(hf_state_dict(model))
    return fingerprint(model.config, params.__getitem__)
