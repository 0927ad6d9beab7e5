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


@pytest.mark.parametrize("zero_point", [True, False, "offset"])
@pytest.mark.parametrize("k,g", [(128, 32), (67, 32), (200, 64)])
def test_int4_roundtrip_error_bound(k, g, zero_point):
    w = torch.randn(k, 20, generator=_gen(2)) * torch.linspace(0.1, 3, 20)
    qw = quantize_int4(w, g, zero_point=zero_point)
    assert qw.qweight.shape == (k, 10) and qw.scales.shape == (-(-k // g), 20)
    s = qw.scales.float().repeat_interleave(g, dim=0)[:k]
    err = (qw.dequantize() - w).abs()
    # Symmetric codes never clamp (|w| / s <= 7), nor do codes above an exact float
    # offset: half a step.  With a zero point the rounded zero can push the extreme code
    # one step out, where it clamps: one step.
    bound = s * (1.0 if zero_point is True else 0.5) + 1e-6
    assert (err <= bound).all()
    rel = float((qw.dequantize() - w).norm() / w.norm())
    assert rel < (0.15 if zero_point is False else 0.1)
    assert qw.zero == {True: "code", False: "none", "offset": "offset"}[zero_point]


def test_int4_offset_beats_code_when_the_range_excludes_zero():
    """A group of all-positive weights: the zero-point code stretches the range to 0,
    the float offset does not."""
    w = torch.rand(64, 16, generator=_gen(3)) + 1.0
    code = quantize_int4(w, 32, zero_point="code")
    offset = quantize_int4(w, 32, zero_point="offset")
    assert offset.zeros.is_floating_point() and code.zeros.dtype == torch.uint8
    assert (offset.dequantize() - w).abs().max() < 0.5 * (code.dequantize() - w).abs().max()


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


def _quantized(fmt, k, splits, dtype, g, seed, zero_point: bool | str = True):
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


# (format, K, splits, group, int4 zero kind): odd K, a ragged last group, fused segments.
KERNEL_CASES = [
    ("int8", 67, (45,), 0, None),
    ("int8", 130, (32, 16, 16), 0, None),
    ("int4", 67, (46,), 32, "code"),
    ("int4", 130, (32, 16, 16), 64, "code"),
    ("int4", 67, (46,), 32, "offset"),
    ("int4", 130, (32, 16, 16), 32, "none"),
]


def _check_dequantized(y, x, qw, t, splits, dtype, p):
    """``y`` against the dequantize-then-matmul reference; all zero when p = 1."""
    w = qw.dequantize(torch.float32)
    if t is None:
        r = (x.float() @ w).to(dtype)
    else:
        r = ref.sparse_linear_fused(x, w, t.cpu() if DEVICE == "cpu" else t, splits)
    check_close(y, r, dtype)
    if p == 1.0:
        assert (y == 0).all()


@pytest.mark.parametrize("fmt,k,splits,g,zero", KERNEL_CASES)
@pytest.mark.parametrize("p", [None, 0.5, 1.0])
@pytest.mark.parametrize("b,dtype", [(1, torch.bfloat16), (3, torch.float16)])
def test_quant_gemv_matches_reference(fmt, k, splits, g, zero, p, b, dtype):
    tq = _tq()
    qw = _quantized(fmt, k, splits, dtype, g, seed=k + b, zero_point=zero or False)
    x = _x(b, k, dtype, seed=b, strided=b > 1)  # batches: a non-contiguous view
    t = _thresholds(x, p, len(splits))
    y = tq.quant_gemv(x, qw.qweight, qw.scales, qw.zeros, t, splits, qw.group_size)
    _check_dequantized(y, x, qw, t, splits, dtype, p)


@pytest.mark.parametrize(
    "k,cfg",
    [
        # Several chunks of several groups, double-buffered walk or not.
        (300, (64, 16, 2, 4, 1, False, False)),
        (300, (64, 16, 2, 4, 1, False, True)),
        # 18 group-aligned chunks of K for wide column blocks: the last program of each
        # block sums 18 partials.
        (1100, (1024, 16, 34, 4, 1, False, False)),
        # Rows as scalars (scalar_rows): a partial last step, several groups, 18 chunks.
        (300, (64, 16, 2, 4, 1, False, False, False, False, True)),
        (1100, (1024, 8, 34, 4, 1, False, False, False, False, True)),
        # ... with the next step's channels and inputs loaded ahead (prefetch).
        (300, (64, 16, 2, 4, 1, False, True, False, False, True)),
        (1100, (512, 8, 34, 4, 1, False, True, False, False, True)),
    ],
)
@pytest.mark.parametrize("zero", ["code", "offset", "none"])
def test_int4_walk_configs_match_reference(k, cfg, zero):
    tq = _tq()
    from teal.kernels.triton_gemv import GemvConfig

    splits, dtype = (64, 32), torch.bfloat16
    qw = _quantized(
        "int4", k, splits, dtype, 32, seed=9, zero_point=False if zero == "none" else zero
    )
    x = _x(1, k, dtype, seed=10, strided=False)
    t = _thresholds(x, 0.4, len(splits))
    y = tq.quant_gemv(x, qw.qweight, qw.scales, qw.zeros, t, splits, 32, None, GemvConfig(*cfg))
    r = ref.sparse_linear_fused(x, qw.dequantize(torch.float32), t.cpu(), splits)
    check_close(y, r.to(y.device), dtype)


@pytest.mark.parametrize("p", [None, 0.5, 1.0])
@pytest.mark.parametrize(
    "cfg",
    [(32, 8, 3, 2), (64, 16, 1, 4), (32, 8, 3, 2, 1, False, True), (32, 32, 3, 2, 1, False, True)],
)
def test_int8_scalar_rows_match_reference(p, cfg):
    """int8 through the fp16 kernel's scalar-row walk: odd K, fused segments."""
    tq = _tq()
    from teal.kernels.triton_gemv import GemvConfig

    k, splits, dtype = 131, (32, 16, 16), torch.bfloat16
    qw = _quantized("int8", k, splits, dtype, 0, seed=13)
    x = _x(1, k, dtype, seed=14, strided=True)
    t = _thresholds(x, p, len(splits))
    c = GemvConfig(*cfg, scalar_rows=True)
    y = tq.quant_gemv(x, qw.qweight, qw.scales, None, t, splits, 0, None, c)
    _check_dequantized(y, x, qw, t, splits, dtype, p)


@pytest.mark.parametrize(
    "fmt,g,zero_point,scalar_rows",
    [
        ("int8", 0, False, False),
        ("int8", 0, False, True),
        ("int4", 32, False, False),
        ("int4", 32, "offset", False),
        ("int4", 32, True, True),
    ],
)
def test_quant_gate_up_act_and_scores_match_reference(fmt, g, zero_point, scalar_rows):
    tq = _tq()
    from teal.kernels.triton_gemv import GemvConfig

    f, k, dtype = 24, 70, torch.bfloat16
    qw = _quantized(fmt, k, (f, f), dtype, g, seed=5, zero_point=zero_point)
    x = _x(1, k, dtype, seed=6, strided=False)
    score = (torch.rand(k, generator=_gen(7)) + 0.5).to(dtype).to(DEVICE)
    t = torch.tensor([0.4, 0.9], device=DEVICE)
    cfg = GemvConfig(64, 16, 2, 4, scalar_rows=True) if scalar_rows else None
    y = tq.quant_gate_up_act(x, qw.qweight, qw.scales, qw.zeros, t, "silu", g, score, cfg)
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


# ----------------------------------------------------------------------------- GGUF repacking


def _gguf_model(tmp_path, qtype, embedding="Q8_0"):
    import teal
    from helpers_ckpt import write_gguf_checkpoint

    overrides = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding}
    path = write_gguf_checkpoint(
        tmp_path / "m.gguf", CFG, seed=4, qtype=qtype, tokenizer=False, overrides=overrides
    )
    return teal.load(path, dtype="fp32", device=DEVICE)


def test_q4_blocks_decode_to_what_gguf_dequantizes():
    import numpy as np
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    from teal.model.loaders import decode_q4

    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    for name in ("Q4_0", "Q4_1"):
        q = GGMLQuantizationType[name]
        raw = quants.quantize(x, q)
        codes, d, m = decode_q4(raw, name)
        assert codes.shape == (5, 96) and d.shape == (5, 3) and codes.max() <= 15
        off = -8.0 * d.astype(np.float32) if m is None else m.astype(np.float32)
        w = codes.reshape(5, 3, 32) * d.astype(np.float32)[..., None] + off[..., None]
        np.testing.assert_array_equal(w.reshape(5, 96), quants.dequantize(raw, q))


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0"])
def test_gguf_repack_keeps_the_files_weights_exactly(tmp_path, qtype):
    model = _gguf_model(tmp_path, qtype, embedding=qtype)
    ids = torch.tensor([[1, 5, 9, 2, 7, 11]], device=DEVICE)
    dense = model(ids)
    wqkv = model.layers[1].attention.wqkv.clone()
    qc = model.quantize("gguf")
    assert qc.label() == "int4-g32-gguf" and qc.source == "gguf" and qc.lm_head
    qw = model.layers[1].attention.wqkv
    assert isinstance(qw, QuantWeight) and qw.group_size == 32
    assert qw.zero == ("offset" if qtype == "Q4_1" else "none")
    assert qw.scales.dtype == torch.float16  # the file's own scales
    # q and k rows were un-permuted like the float weights: the same matrix, bit for bit.
    assert torch.equal(qw.dequantize(torch.float32), wqkv)
    model.set_backend("torch")
    torch.testing.assert_close(model(ids), dense, rtol=0, atol=1e-5)


def test_gguf_repack_runs_the_int4_kernels(tmp_path):
    _tq()
    model = _gguf_model(tmp_path, "Q4_1")
    model.quantize("gguf")
    assert model.lm_head.fmt == "int8"  # a Q8_0 head: int8 per output channel
    ids = torch.tensor([[1, 5, 9, 2, 7, 11]], device=DEVICE)
    model.setup_cache(1, 16)
    model(ids[:, :5], torch.arange(5, device=DEVICE))
    step = (ids[:, 5:], torch.tensor([5], device=DEVICE))
    model.set_sparsity(torch.full((CFG.n_layers, 7), 0.02), mode="decode")
    model.set_backend("torch")
    want = model(*step)
    model.set_backend("triton")
    got = model(*step)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if DEVICE == "cpu":  # the native CPU kernels walk the same fp16 scales and offsets
        model.set_backend("cpu")
        torch.testing.assert_close(model(*step), want, rtol=1e-4, atol=1e-4)


def test_gguf_repack_refuses_what_it_cannot_keep(tmp_path):
    model = random_model(CFG, dtype=torch.float32, device=DEVICE, seed=3)
    with pytest.raises(ValueError, match="loaded from random"):
        model.quantize("gguf")
    q8 = _gguf_model(tmp_path, "Q8_0")
    with pytest.raises(ValueError, match="q_proj.weight is not stored as Q4_0 or Q4_1"):
        q8.quantize("gguf")
    assert q8.quant is None and not isinstance(q8.layers[0].attention.wqkv, QuantWeight)
    changed = _gguf_model(tmp_path / "b", "Q4_1")
    with torch.no_grad():
        changed.layers[1].mlp.w_down[3, 4] += 0.5
    with pytest.raises(ValueError, match="layer 1 w_down: the model's weights are not those"):
        changed.quantize("gguf")
    # Nothing was replaced: an error leaves the model whole.
    assert changed.quant is None and not isinstance(changed.layers[0].mlp.w_down, QuantWeight)


def test_gguf_repack_can_keep_a_float_head(tmp_path):
    model = _gguf_model(tmp_path, "Q4_1")  # head Q8_0
    head = model.lm_head.clone()
    qc = model.quantize("gguf", lm_head=False)
    assert not qc.lm_head and torch.equal(model.lm_head, head)
