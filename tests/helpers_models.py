"""The tiny model configuration most unit tests build their random models from."""

from __future__ import annotations

# Two layers, grouped-query attention (6 query heads on 2 KV heads), odd-sized MLP.
TINY = dict(
    arch="llama",
    vocab_size=97,
    dim=48,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    head_dim=8,
    ffn_dim=80,
    max_seq_len=256,
)
