"""The decode engine's state machine (positions, output buffer, sampling) on the CPU:
the same step the CUDA graph captures, run eagerly, against the eager generation loop."""

from __future__ import annotations

import torch

from teal.engine.cuda import CudaEngine
from teal.generate import generate
from teal.model.build import random_model
from teal.model.config import ModelConfig

CFG = ModelConfig(
    vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=80,
    max_seq_len=128,
)  # fmt: skip


def _tokens(engine: CudaEngine, prompt: list[int], n: int) -> list[int]:
    return engine.generate(torch.tensor([prompt]), n).tokens.tolist()


def test_engine_tokens_equal_the_eager_loop_dense_and_sparse():
    model = random_model(CFG, dtype=torch.float32, seed=11)
    prompt = [3, 14, 15, 92, 65, 35]
    engine = CudaEngine(model, len(prompt) + 24, compile="none", graph=False)
    assert (
        _tokens(engine, prompt, 24)
        == generate(model, prompt, max_new_tokens=24, stop_at_eos=False).token_ids
    )
    model.set_sparsity(torch.full((CFG.n_layers, 7), 0.6), mode="decode")
    want = generate(model, prompt, max_new_tokens=24, stop_at_eos=False).token_ids
    model.setup_cache(1, len(prompt) + 24)
    engine = CudaEngine(model, len(prompt) + 24, compile="none", graph=False)
    got = _tokens(engine, prompt, 24)
    assert got == want
    # A second run from a new prompt reuses the buffers without stale tokens.
    assert (
        _tokens(engine, prompt[:3], 10)
        == generate(model, prompt[:3], max_new_tokens=10, stop_at_eos=False).token_ids
    )


def test_stream_tokens_match_generate():
    model = random_model(CFG, dtype=torch.float32, seed=12)
    engine = CudaEngine(model, 20, compile="none", graph=False)
    streamed = list(engine.stream_tokens(torch.tensor([[5, 6, 7]]), 12))
    assert streamed == _tokens(engine, [5, 6, 7], 12)
