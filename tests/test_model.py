"""Our decoder against the reference implementation (Hugging Face transformers) on tiny
random Llama, Mistral (sliding window) and Qwen2 (q/k/v bias) models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers_models import TINY as SHARED_TINY  # noqa: E402
from teal.model.build import from_checkpoint, hf_state_dict, random_model  # noqa: E402
from teal.model.config import ModelConfig  # noqa: E402

# The shared tiny shapes; each case below names its architecture.
TINY = {**{k: v for k, v in SHARED_TINY.items() if k != "arch"}, "max_seq_len": 96}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama": (dict(arch="llama"), {}),
    "llama3-rope-tied": (dict(arch="llama", tie_embeddings=True), {"rope_scaling": LLAMA3_ROPE}),
    "mistral-sliding": (dict(arch="mistral"), {"sliding_window": 8}),
    "qwen2-bias": (dict(arch="qwen2", qkv_bias=True), {}),
}


def make_pair(case: str, seed: int = 0):
    """A transformers model with random weights (norms and biases too) and ours built
    from its state dict."""
    ours_kw, hf_extra = CASES[case]
    cfg_dict = ModelConfig(**TINY, **ours_kw).to_hf()
    cfg_dict.update(hf_extra)
    cfg = ModelConfig.from_hf(cfg_dict)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg_dict), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if "norm" in name:
                t.normal_(1.0, 0.2)
            elif "bias" in name:
                t.normal_(0.0, 0.2)
    ours = from_checkpoint(cfg, hf.state_dict().__getitem__, dtype=torch.float32)
    return cfg, hf, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    cfg, hf, ours = make_pair(case)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


def test_sliding_window_is_applied():
    """The Mistral case would differ from full attention past the window: make sure the
    window is honoured rather than the match being an accident."""
    cfg, hf, ours = make_pair("mistral-sliding")
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    full = from_checkpoint(
        cfg.replace(sliding_windows=(None,) * cfg.n_layers),
        hf.state_dict().__getitem__,
        dtype=torch.float32,
    )
    with torch.no_grad():
        assert (ours(ids) - full(ids))[:, 9:].abs().max() > 1e-3
        assert (ours(ids) - full(ids))[:, :8].abs().max() < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_cache_prefill_and_decode_match_full_forward(case):
    cfg, _, ours = make_pair(case)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ours(ids)
        ours.setup_cache(2, 32)
        pre = ours(ids[:, :16], torch.arange(16))
        steps = [ours(ids[:, t : t + 1], torch.tensor([t])) for t in range(16, 24)]
    assert (pre - ref[:, :16]).abs().max() <= 1e-5
    assert (torch.cat(steps, dim=1) - ref[:, 16:]).abs().max() <= 1e-5


@pytest.mark.parametrize("case", ["llama", "qwen2-bias"])
def test_greedy_generation_matches_transformers(case):
    cfg, hf, ours = make_pair(case)
    prompt = [5, 17, 3, 60, 22, 9]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            min_new_tokens=32,
            pad_token_id=0,
        )
    out = ours.generate(prompt, max_new_tokens=32, stop_at_eos=False)
    assert out.token_ids == ref[0, len(prompt) :].tolist()
    assert out.new_tokens == 32 and out.prompt_tokens == len(prompt)


def test_hf_state_dict_round_trip():
    cfg, hf, ours = make_pair("qwen2-bias")
    ref = hf.state_dict()
    mine = dict(hf_state_dict(ours))
    for name, t in mine.items():
        assert torch.equal(t, ref[name]), name
    assert set(mine) == {k for k in ref if k != "lm_head.weight" or not cfg.tie_embeddings}


def test_sparse_decode_keeps_prefill_dense_and_sparsifies_steps():
    cfg = ModelConfig(**TINY)
    model = random_model(cfg, dtype=torch.float32, seed=4)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dense = model(ids)
        model.set_sparsity(torch.full((cfg.n_layers, 7), 0.5), mode="decode")
        model.setup_cache(1, 16)
        pre = model(ids[:, :11], torch.arange(11))
        step = model(ids[:, 11:], torch.tensor([11]))
        everywhere = model(ids, sparse_mask=torch.ones(1, 12, dtype=torch.bool))
        model.set_sparsity(torch.full((cfg.n_layers, 7), 0.5), mode="all")
        all_mode = model(ids)
    assert (pre - dense[:, :11]).abs().max() <= 1e-5  # prefill stayed dense
    assert (step - dense[:, 11:]).abs().max() > 1e-3  # the decode step did not
    assert (step - everywhere[:, 11:]).abs().max() <= 1e-4  # and equals a sparse position
    assert torch.allclose(all_mode, everywhere, atol=1e-5)


def test_zero_threshold_sparse_equals_dense():
    cfg = ModelConfig(**TINY)
    model = random_model(cfg, dtype=torch.float32, seed=6)
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        dense = model(ids)
        model.set_sparsity(torch.full((cfg.n_layers, 7), -1.0), mode="all")
        assert torch.allclose(model(ids), dense, atol=1e-6)


def test_threshold_shape_is_checked():
    model = random_model(ModelConfig(**TINY), dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        model.set_sparsity(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="mode"):
        model.set_sparsity(torch.zeros(2, 7), mode="prefill")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_close_to_fp32(dtype):
    cfg, hf, ours = make_pair("llama")
    low = from_checkpoint(cfg, hf.state_dict().__getitem__, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = ours(ids)
        out = low(ids).float()
    assert low.layers[0].attention.wqkv.dtype == dtype
    assert low.inv_freq.dtype == torch.float32  # RoPE angles stay in fp32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
