"""Quantized weights (int8, int4): round-trip error, the Triton kernels against the
dequantize-then-matmul reference (under TRITON_INTERPRET=1 without a GPU), and a tiny
quantized model on the reference path against the Triton path."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers_kernels import check_close  # noqa: E402
from teal.kernels import reference as ref  # noqa: E402
from teal.model.build import random_model  # noqa: E402
from teal.model.config import ModelConfig  # noqa: E402
from teal.model.quant import (  # noqa: E402
    QuantWeight,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- format


def test_int4_pack_roundtrip_and_layout():
    q = torch.randint(0, 16, (5, 12), generator=_gen(0), dtype=torch.uint8)
    packed = pack_int4(q, (8, 4))
    assert packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed, (8, 4)), q)
    # Segment of width 8: byte j holds column j (low nibble) and column j + 4 (high).
    assert torch.equal(packed[:, 1] & 15, q[:, 1]) and torch.equal(packed[:, 1] >> 4, q[:, 5])
    assert torch.equal(packed[:, 4] & 15, q[:, 8]) and torch.equal(packed[:, 4] >> 4, q[:, 10])


def test_int8_roundtrip_error_within_half_a_step():
    w = torch.randn(70, 33, generator=_gen(1))
    qw = quantize_int8(w)
    assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (33,)
    err = (qw.dequantize() - w).abs()
    assert (err <= qw.scales[None, :] / 2 + 1e-6).all()


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("k,g", [(128, 32), (67, 32), (200, 64)])
def test_int4_roundtrip_error_bound(k, g, zero_point):
    w = torch.randn(k, 20, generator=_gen(2)) * torch.linspace(0.1, 3, 20)
    qw = quantize_int4(w, g, zero_point=zero_point)
    assert qw.qweight.shape == (k, 10) and qw.scales.shape == (-(-k // g), 20)
    s = qw.scales.float().repeat_interleave(g, dim=0)[:k]
    err = (qw.dequantize() - w).abs()
    # Symmetric codes never clamp (|w| / s <= 7): half a step.  With a zero point the
    # rounded zero can push the extreme code one step out, where it clamps: one step.
    bound = s * (1.0 if zero_point else 0.5) + 1e-6
    assert (err <= bound).all()
    rel = float((qw.dequantize() - w).norm() / w.norm())
    assert rel < (0.1 if zero_point else 0.15)


# ----------------------------------------------------------------------------- kernels


def _tq():
    pytest.importorskip("triton")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    import importlib

    from teal.kernels import triton_gemv, triton_quant

    if DEVICE == "cpu" and type(triton_quant._q4_kernel).__name__ == "JITFunction":
        importlib.reload(triton_gemv)
        triton_quant = importlib.reload(triton_quant)
    return triton_quant


def _quantized(fmt, k, splits, dtype, g, seed, zero_point=True):
    w = torch.randn(k, sum(splits), generator=_gen(seed)) / k**0.5
    if fmt == "int8":
        qw = quantize_int8(w, splits)
    else:
        qw = quantize_int4(w, g, splits, zero_point=zero_point, scale_dtype=dtype)
    return qw.to(DEVICE)


def _x(b, k, dtype, seed, strided):
    x = torch.randn(b, 2 * k if strided else k, generator=_gen(seed)).to(dtype)
    return (x[:, ::2] if strided else x).to(DEVICE)


def _thresholds(x, p, n):
    if p is None:
        return None
    if p >= 1.0:
        return torch.full((n,), 1e4, device=DEVICE)
    t = float(torch.quantile(x.float().abs().flatten().cpu(), p).to(torch.bfloat16).float())
    return torch.full((n,), t, device=DEVICE)


# (format, K, splits, group): odd K, a ragged last group, fused segments.
KERNEL_CASES = [
    ("int8", 67, (45,), 0),
    ("int8", 130, (32, 16, 16), 0),
    ("int4", 67, (46,), 32),
    ("int4", 130, (32, 16, 16), 64),
]


@pytest.mark.parametrize("fmt,k,splits,g", KERNEL_CASES)
@pytest.mark.parametrize("p", [None, 0.5, 1.0])
@pytest.mark.parametrize("b,dtype", [(1, torch.bfloat16), (3, torch.float16)])
def test_quant_gemv_matches_reference(fmt, k, splits, g, p, b, dtype):
    tq = _tq()
    qw = _quantized(fmt, k, splits, dtype, g, seed=k + b)
    x = _x(b, k, dtype, seed=b, strided=b > 1)  # batches: a non-contiguous view
    t = _thresholds(x, p, len(splits))
    y = tq.quant_gemv(x, qw.qweight, qw.scales, qw.zeros, t, splits, qw.group_size)
    w = qw.dequantize(torch.float32)
    if t is None:
        r = (x.float() @ w).to(dtype)
    else:
        r = ref.sparse_linear_fused(x, w, t.cpu() if DEVICE == "cpu" else t, splits)
    check_close(y, r, dtype)
    if p == 1.0:
        assert (y == 0).all()


@pytest.mark.parametrize("prefetch", [False, True])
def test_int4_walk_configs_match_reference(prefetch):
    """Several chunks of several groups, double-buffered walk or not."""
    tq = _tq()
    from teal.kernels.triton_gemv import GemvConfig

    k, splits, dtype = 300, (64, 32), torch.bfloat16
    qw = _quantized("int4", k, splits, dtype, 32, seed=9)
    x = _x(1, k, dtype, seed=10, strided=False)
    t = _thresholds(x, 0.4, len(splits))
    cfg = GemvConfig(64, 16, 2, 4, 1, False, prefetch)
    y = tq.quant_gemv(x, qw.qweight, qw.scales, qw.zeros, t, splits, 32, None, cfg)
    r = ref.sparse_linear_fused(x, qw.dequantize(torch.float32), t.cpu(), splits)
    check_close(y, r.to(y.device), dtype)


@pytest.mark.parametrize("fmt,g,zero_point", [("int8", 0, False), ("int4", 32, False)])
def test_quant_gate_up_act_and_scores_match_reference(fmt, g, zero_point):
    tq = _tq()
    f, k, dtype = 24, 70, torch.bfloat16
    qw = _quantized(fmt, k, (f, f), dtype, g, seed=5, zero_point=zero_point)
    x = _x(1, k, dtype, seed=6, strided=False)
    score = (torch.rand(k, generator=_gen(7)) + 0.5).to(dtype).to(DEVICE)
    t = torch.tensor([0.4, 0.9], device=DEVICE)
    y = tq.quant_gate_up_act(x, qw.qweight, qw.scales, qw.zeros, t, "silu", g, score)
    r = ref.sparse_gate_up_act(x, qw.dequantize(torch.float32), t, "silu", score)
    check_close(y, r, dtype)


# ----------------------------------------------------------------------------- model

CFG = ModelConfig(
    vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
    max_seq_len=64,
)  # fmt: skip


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_model_reference_and_triton_paths_agree(fmt):
    _tq()
    model = random_model(CFG, dtype=torch.float32, device=DEVICE, seed=3)
    ids = torch.tensor([[1, 5, 9, 2, 7, 11]], device=DEVICE)
    dense = model(ids)
    model.quantize(fmt, group_size=32)
    assert isinstance(model.layers[0].mlp.w_gate_up, QuantWeight)
    assert isinstance(model.lm_head, QuantWeight)
    q = model(ids)  # prefill rows: the reference (dequantize, matmul)
    assert (q - dense).abs().max() < 0.2 * dense.abs().max()

    model.setup_cache(1, 16)
    model(ids[:, :5], torch.arange(5, device=DEVICE))
    step = (ids[:, 5:], torch.tensor([5], device=DEVICE))
    thr = torch.full((CFG.n_layers, 7), 0.02)
    thr[:, 4] = 0.03  # gate and up with different thresholds
    model.set_sparsity(thr, mode="decode")
    model.set_backend("torch")
    want = model(*step)
    model.set_backend("triton")
    got = model(*step)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    model.clear_sparsity()
