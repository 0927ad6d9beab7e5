"""The Hugging Face adapter applies exactly our model's sparsity rule."""

from __future__ import annotations

import pytest
import torch

from teal import hf as teal_hf
from teal.model.build import fingerprint, from_checkpoint
from teal.model.config import ModelConfig

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(
    vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=80,
    max_seq_len=64,
)  # fmt: skip


def _pair():
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**CFG.to_hf()), attn_implementation="eager"
    ).eval()
    ours = from_checkpoint(CFG, hf.state_dict().__getitem__, dtype=torch.float32)
    ours.fingerprint = fingerprint(CFG, hf.state_dict().__getitem__)
    return hf, ours


@pytest.mark.parametrize("level", [0.0, 0.3, 0.6])
def test_adapter_matches_our_sparse_model(level):
    hf, ours = _pair()
    gen = torch.Generator().manual_seed(1)
    thresholds = torch.rand(CFG.n_layers, 7, generator=gen) * level
    ids = torch.randint(0, CFG.vocab_size, (2, 20), generator=gen)
    handle = teal_hf.sparsify(hf, thresholds, mode="all")
    ours.set_sparsity(thresholds, mode="all")
    with torch.no_grad():
        got, want = hf(ids).logits, ours(ids)
    assert (got - want).abs().max() <= 1e-4
    handle.remove()
    ours.clear_sparsity()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_decode_mode_leaves_prefill_dense():
    hf, _ = _pair()
    ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = hf(ids).logits
        handle = teal_hf.sparsify(hf, torch.full((CFG.n_layers, 7), 0.5), mode="decode")
        assert torch.equal(hf(ids).logits, dense)
        assert not torch.allclose(hf(ids[:, :1]).logits, dense[:, :1])
        handle.remove()


def test_fingerprint_is_shared_with_our_loader():
    hf, ours = _pair()
    assert teal_hf.fingerprint(hf) == ours.fingerprint


def test_threshold_shape_is_checked():
    hf, _ = _pair()
    with pytest.raises(ValueError, match="shape"):
        teal_hf.sparsify(hf, torch.zeros(5, 7))
