"""Tiny random checkpoints on disk, in the formats the loaders read, for tests.

    cfg = ModelConfig(arch="llama", vocab_size=320, dim=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=16, ffn_dim=128, bos_token_id=1, eos_token_ids=(2,))
    folder = write_hf_checkpoint(tmp_path / "hf", cfg, seed=0)            # config.json, safetensors
    gguf = write_gguf_checkpoint(tmp_path / "m.gguf", cfg, seed=0, qtype="Q8_0")

Both write the weights of ``random_state_dict(cfg, seed)`` (Hugging Face names and layout), so
the two files of one seed hold the same model up to quantization. The GGUF side is written the
way llama.cpp's converter writes it: q/k rows permuted for llama-arch files, 2-D weights
quantized, norms and biases F32, no ``output.weight`` when embeddings are tied, Llama-3 rope
scaling as a ``rope_freqs.weight`` tensor. Both carry a small byte-level BPE tokenizer (specials
``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2; a ChatML chat template).

This module knows the formats independently of ``teal.model.loaders`` (its own name table and
permutation), so tests built on it check the loaders rather than repeat them.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from teal.model.config import ModelConfig

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "gguf_permute",
    "random_state_dict",
    "tiny_tokenizer",
    "write_gguf_checkpoint",
    "write_hf_checkpoint",
]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- weights


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (cfg.dim,),
            p + "self_attn.q_proj.weight": (q, cfg.dim),
            p + "self_attn.k_proj.weight": (kv, cfg.dim),
            p + "self_attn.v_proj.weight": (kv, cfg.dim),
        }
        if cfg.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        shapes |= {
            p + "self_attn.o_proj.weight": (cfg.dim, q),
            p + "post_attention_layernorm.weight": (cfg.dim,),
            p + "mlp.gate_proj.weight": (cfg.ffn_dim, cfg.dim),
            p + "mlp.up_proj.weight": (cfg.ffn_dim, cfg.dim),
            p + "mlp.down_proj.weight": (cfg.dim, cfg.ffn_dim),
        }
    shapes["model.norm.weight"] = (cfg.dim,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def random_state_dict(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Seeded random weights in Hugging Face naming and layout: matrices ~ N(0, 0.02), norms
    ~ N(1, 0.1) and biases ~ N(0, 0.1), so that a mix-up of any two tensors shows."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _hf_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        out[name] = t.to(dtype)
    return out


# ---------------------------------------------------------------- tokenizer

_CORPUS = (
    "The capital of France is Paris. The capital of Italy is Rome. "
    "Once upon a time there was a little model that wanted to be sparse. "
    "It read the weights, it thought about the activations, and it skipped the small ones. "
    "Hello, world! How are you today? I am fine, thank you. 1 2 3 4 5 6 7 8 9 10. "
    "the quick brown fox jumps over the lazy dog; THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG."
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (byte-level BPE's alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return spelled


@functools.lru_cache(maxsize=16)
def _vocab_and_merges(vocab_size: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Token list (id order) and merges of a tiny byte-level BPE, learned deterministically
    (ties broken by the pair itself) from a fixed corpus, padded to exactly ``vocab_size``."""
    from tokenizers import pre_tokenizers

    spelled = _bytes_to_unicode()
    # Smaller vocabularies keep the most useful bytes: letters, space, digits, punctuation.
    order = sorted(range(256), key=lambda b: (not chr(b).isalpha(), b != 32, not chr(b).isdigit(),
                                               not 32 < b < 127, b))  # fmt: skip
    n_alpha = min(256, vocab_size - len(SPECIAL_TOKENS))
    if n_alpha < 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for a tokenizer")
    alphabet = [spelled[b] for b in sorted(order[:n_alpha])]
    tokens = [*SPECIAL_TOKENS, *alphabet]
    known = set(alphabet)
    words: dict[tuple[str, ...], int] = {}
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for word, _ in splitter.pre_tokenize_str(_CORPUS):
        pieces = tuple(ch for ch in word if ch in known)
        if len(pieces) > 1:
            words[pieces] = words.get(pieces, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(tokens) < vocab_size:
        counts: dict[tuple[str, str], int] = {}
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        tokens.append(best[0] + best[1])
        merged = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    tokens += [f"<|reserved_{i}|>" for i in range(vocab_size - len(tokens))]
    return tuple(tokens), tuple(merges)


def tiny_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens (GPT-2 style)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = _vocab_and_merges(vocab_size)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in tokens if t in SPECIAL_TOKENS or t.startswith("<|reserved_")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


# ---------------------------------------------------------------- Hugging Face folders


def write_hf_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    tokenizer: bool = True,
) -> Path:
    """A Hugging Face checkpoint folder: config.json, model.safetensors (or ``shards`` files
    with model.safetensors.index.json), and tokenizer.json + tokenizer_config.json."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    state = random_state_dict(config, seed, _DTYPES[dtype])
    names = list(state)
    if shards <= 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / shards)
        weight_map, total = {}, 0
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[k * per : (k + 1) * per]}
            save_file(part, str(folder / file), metadata={"format": "pt"})
            for n, t in part.items():
                weight_map[n] = file
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        tiny_tokenizer(config.vocab_size).save(str(folder / "tokenizer.json"))
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[1],
            "eos_token": SPECIAL_TOKENS[2],
            "unk_token": SPECIAL_TOKENS[0],
            "pad_token": SPECIAL_TOKENS[2],
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": config.max_seq_len,
            "chat_template": CHAT_TEMPLATE,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return folder


# ---------------------------------------------------------------- GGUF files

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def gguf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation of llama q/k rows (rotate-half -> interleaved pairs):
    per head, reshape rows to [2, d/2], swap the two axes, flatten."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as ``rope_freqs.weight``."""
    s = config.rope_scaling or {}
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, config.head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / config.rope_theta ** (i / config.head_dim))
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# f16 scale fields (byte offsets) in each K-quant block, and a scale that gives weights of
# about 0.02 given the block's other (random) bytes.
_KQUANT_SCALES = {
    "Q2_K": ((80, 82), 1e-3),
    "Q3_K": ((108,), 1e-3),
    "Q4_K": ((0, 2), 1e-4),
    "Q5_K": ((0, 2), 5e-5),
    "Q6_K": ((208,), 2e-5),
}


def _encode(w: torch.Tensor, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    import gguf

    arr = w.detach().float().numpy()
    if qtype == "F32" or w.dim() == 1:  # llama.cpp keeps 1-D tensors (norms, biases) in F32
        return arr, None
    if qtype == "F16":
        return arr.astype(np.float16), None
    q = gguf.GGMLQuantizationType[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[q]
    if arr.shape[-1] % block:
        raise ValueError(f"{qtype} needs rows that are multiples of {block}, got {arr.shape}")
    if qtype in _KQUANT_SCALES:
        # gguf-py cannot quantize K-quants: write random blocks with small, finite scales.
        # The stored values are then what gguf.quants.dequantize makes of these bytes, not w.
        n_blocks = arr.shape[-1] // block
        raw = rng.integers(0, 256, (*arr.shape[:-1], n_blocks, type_size), dtype=np.uint8)
        offsets, size = _KQUANT_SCALES[qtype]
        for off in offsets:
            scale = rng.uniform(0.5 * size, 1.5 * size, raw.shape[:-1]).astype(np.float16)
            raw[..., off : off + 2] = scale[..., None].view(np.uint8)
        return raw.reshape(*arr.shape[:-1], n_blocks * type_size), q
    return gguf.quants.quantize(arr, q), q


def write_gguf_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    seed: int = 0,
    qtype: str = "F32",
    tokenizer: bool = True,
    *,
    overrides: Mapping[str, str] | None = None,
    name: str = "tiny-random",
) -> Path:
    """A GGUF file as llama.cpp's converter writes one. ``qtype`` (F32, F16, BF16, Q8_0, Q4_0,
    Q4_1, Q5_0, Q5_1, Q2_K..Q6_K) applies to every 2-D weight, ``overrides`` maps a Hugging Face
    name to another type (e.g. the embedding in Q8_0). Llama and Mistral configs are written as
    arch "llama" (as llama.cpp does for Mistral), Qwen2 as "qwen2". ``path`` is the file, or a
    folder that receives ``model.gguf``."""
    import gguf

    out = Path(path)
    if out.is_dir() or out.suffix != ".gguf":
        out.mkdir(parents=True, exist_ok=True)
        out = out / "model.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = "qwen2" if config.arch == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(out), arch=arch)
    w.add_name(name)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.dim // config.n_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    kind = (config.rope_scaling or {}).get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling["factor"])
    if tokenizer:
        tokens, merges = _vocab_and_merges(config.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(list(tokens))
        control = set(SPECIAL_TOKENS)
        w.add_token_types([3 if t in control or t.startswith("<|reserved_") else 1 for t in tokens])
        w.add_token_merges([f"{a} {b}" for a, b in merges])
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    bos = config.bos_token_id if config.bos_token_id is not None else (1 if tokenizer else None)
    eos = config.eos_token_ids[0] if config.eos_token_ids else (2 if tokenizer else None)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if tokenizer:
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)

    rng = np.random.default_rng(seed)
    if kind == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    for hf, t in random_state_dict(config, seed).items():
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            t = gguf_permute(t, config.n_heads if ".q_proj." in hf else config.n_kv_heads)
        data, raw_dtype = _encode(t, (overrides or {}).get(hf, qtype), rng)
        w.add_tensor(gguf_name(hf), data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
