"""Triton sparse GEMV kernels against the plain-torch reference.

Without a GPU the kernels run under the Triton interpreter (small shapes); with one
they run natively. Speed is measured in benchmarks/bench_kernels.py, never here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels (at import of triton_gemv).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import importlib  # noqa: E402

from helpers_kernels import check_close  # noqa: E402
from teal.kernels import reference as ref  # noqa: E402
from teal.kernels import triton_gemv as tg  # noqa: E402

if not torch.cuda.is_available() and type(tg._sparse_gemv_kernel).__name__ == "JITFunction":
    # Another module imported the kernels before TRITON_INTERPRET was set: decorate again.
    tg = importlib.reload(tg)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = [torch.float16, torch.bfloat16]
# (K, N): odd sizes, a single input channel, sizes that are not multiples of any block.
SHAPES = [(67, 45), (1, 33), (128, 96), (301, 130)]
SPARSITY = [0.0, 0.5, 0.9, 1.0]  # 1.0: the threshold drops every input


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(b, k, n, dtype, seed=0, scale=False):
    g = _gen(seed)
    x = torch.randn(b, k, generator=g).to(dtype)
    wt = (torch.randn(k, n, generator=g) / k**0.5).to(dtype)
    s = (torch.rand(k, generator=g) + 0.5).to(dtype) if scale else None
    return x.to(DEVICE), wt.to(DEVICE), None if s is None else s.to(DEVICE)


def _threshold(x, p, scale=None):
    """A threshold that drops about a fraction p of the scores.

    Rounded to a bf16 value (exact in fp16 too), so that the kernel and the reference
    compare against the same number whichever precision they compare in.
    """
    if p <= 0.0:
        return -1.0  # keeps everything, zeros included
    if p >= 1.0:
        return 1e4
    sc = x.float().abs() if scale is None else (x.abs() * scale.to(x.dtype)).float()
    return float(torch.quantile(sc.flatten().cpu(), p).to(torch.bfloat16).float())


def _tensor(ts):
    return torch.tensor(ts, dtype=torch.float32, device=DEVICE).reshape(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("p", SPARSITY)
@pytest.mark.parametrize("b", [1, 3])
def test_sparse_gemv(dtype, k, n, p, b):
    use_scale = p == 0.5  # the weight-informed score, once per shape and batch
    x, wt, s = _inputs(b, k, n, dtype, seed=k * n + b, scale=use_scale)
    t = _tensor(_threshold(x, p, s))
    y = tg.sparse_gemv(x, wt, t, s)
    check_close(y, ref.sparse_linear(x, wt, t, s), dtype)
    if p >= 1.0:
        assert (y == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [(64, 16, 16), (45, 19), (7, 33, 1, 20)])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("use_scale", [False, True])
def test_sparse_gemv_fused(dtype, splits, b, use_scale):
    k, n = 131, sum(splits)
    x, wt, s = _inputs(b, k, n, dtype, seed=n + b, scale=use_scale)
    ps = [0.0, 0.5, 0.9, 1.0][: len(splits)]
    t = _tensor([_threshold(x, p, s) for p in ps])
    y = tg.sparse_gemv_fused(x, wt, t, splits, s)
    check_close(y, ref.sparse_linear_fused(x, wt, t, splits, s), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "relu", "relu2", "gelu", "drelu"])
@pytest.mark.parametrize("b", [1, 3])
def test_sparse_gate_up_act(dtype, act, b):
    k, f = 97, 70
    x, wt, _ = _inputs(b, k, 2 * f, dtype, seed=f + b)
    t = _tensor([_threshold(x, 0.4), _threshold(x, 0.7)])
    y = tg.sparse_gate_up_act(x, wt, t, act)
    check_close(y, ref.sparse_gate_up_act(x, wt, t, act), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_up_all_dropped_and_dense(dtype):
    x, wt, s = _inputs(2, 64, 96, dtype, seed=5, scale=True)
    y = tg.sparse_gate_up_act(x, wt, _tensor([1e4, 1e4]), "silu", s)
    assert (y == 0).all()
    t = _tensor([0.0, -1.0])  # |x| > 0 keeps every nonzero input: 0 % sparsity
    check_close(
        tg.sparse_gate_up_act(x, wt, t, "silu", s),
        ref.sparse_gate_up_act(x, wt, t, "silu", s),
        dtype,
    )


CONFIGS = [
    tg.GemvConfig(block_n=16, rows=16, split_k=1, num_warps=1),
    tg.GemvConfig(block_n=32, rows=16, split_k=7, num_warps=2),
    tg.GemvConfig(block_n=64, rows=64, split_k=3, num_warps=4),
    tg.GemvConfig(block_n=256, rows=32, split_k=2, num_warps=8),
    tg.GemvConfig(block_n=32, rows=16, split_k=5, num_warps=4, dot=True),
    tg.GemvConfig(block_n=64, rows=32, split_k=1, num_warps=4, num_stages=3, dot=True),
    tg.GemvConfig(block_n=64, rows=16, split_k=3, num_warps=4, prefetch=True),
    tg.GemvConfig(block_n=512, rows=16, split_k=1, num_warps=8, prefetch=True),
    tg.GemvConfig(block_n=64, rows=16, split_k=3, num_warps=1, row_sum=True),
    tg.GemvConfig(block_n=32, rows=16, split_k=5, num_warps=1, row_sum=True, peel=True),
    tg.GemvConfig(block_n=64, rows=32, split_k=1, num_warps=2, peel=True),
    # Many chunks of K (23 partials per output block) over wide blocks.
    tg.GemvConfig(block_n=512, rows=16, split_k=23, num_warps=4, peel=True),
    # Kept rows as scalars: a partial last step, and many chunks of K.
    tg.GemvConfig(block_n=64, rows=8, split_k=3, num_warps=2, scalar_rows=True),
    tg.GemvConfig(block_n=256, rows=16, split_k=23, num_warps=4, scalar_rows=True),
    tg.GemvConfig(block_n=64, rows=8, split_k=3, num_warps=2, prefetch=True, scalar_rows=True),
]


def _cfg_id(c):
    return (
        f"n{c.block_n}r{c.rows}s{c.split_k}d{c.dot:d}p{c.prefetch:d}r{c.row_sum:d}e{c.peel:d}"
        f"{'S' if c.scalar_rows else ''}"
    )


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_config_path(cfg, dtype):
    """Block widths, split-K (with its ticketed reduction), the dot path at batch 1."""
    x, wt, _ = _inputs(1, 203, 150, dtype, seed=11)
    t = _tensor([_threshold(x, 0.3), _threshold(x, 0.6)])
    y = tg.sparse_gemv_fused(x, wt, t, (100, 50), config=cfg)
    check_close(y, ref.sparse_linear_fused(x, wt, t, (100, 50)), dtype)
    g = tg.sparse_gate_up_act(x, wt[:, :150], t, "silu", config=cfg)
    check_close(g, ref.sparse_gate_up_act(x, wt[:, :150], t, "silu"), dtype)
    # One threshold for gate and up: the peeled configs walk one shared list.
    t1 = _tensor([_threshold(x, 0.45)] * 2)
    g = tg.sparse_gate_up_act(x, wt[:, :150], t1, "silu", config=cfg)
    check_close(g, ref.sparse_gate_up_act(x, wt[:, :150], t1, "silu"), dtype)


@pytest.mark.parametrize(
    "cfg",
    [
        tg.GemvConfig(block_n=32, rows=16, split_k=3, num_warps=1, row_sum=True, peel=True),
        tg.GemvConfig(block_n=16, rows=32, split_k=1, num_warps=1, peel=True),
        tg.GemvConfig(block_n=32, rows=8, split_k=2, num_warps=1, scalar_rows=True),
    ],
    ids=_cfg_id,
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_width_dividing_n(cfg, dtype):
    """Segments that the block width divides: the walk drops its column mask."""
    x, wt, _ = _inputs(1, 203, 128, dtype, seed=12)
    t = _tensor([_threshold(x, 0.3), _threshold(x, 0.5), _threshold(x, 0.7)])
    y = tg.sparse_gemv_fused(x, wt, t, (64, 32, 32), config=cfg)
    check_close(y, ref.sparse_linear_fused(x, wt, t, (64, 32, 32)), dtype)
    g = tg.sparse_gate_up_act(x, wt, t[:2], "silu", config=cfg)
    check_close(g, ref.sparse_gate_up_act(x, wt, t[:2], "silu"), dtype)
    g = tg.sparse_gate_up_act(x, wt, t[1:2].expand(2), "silu", config=cfg)
    check_close(g, ref.sparse_gate_up_act(x, wt, t[1:2].expand(2), "silu"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_leading_dims(dtype):
    k, n = 90, 50
    g = _gen(3)
    wt = (torch.randn(k, n, generator=g) / k**0.5).to(dtype).to(DEVICE)
    t = _tensor(0.5)
    # A transposed view: x[b, k] lives at stride (1, 3).
    xt = torch.randn(k, 3, generator=g).to(dtype).to(DEVICE).t()
    assert not xt.is_contiguous()
    check_close(tg.sparse_gemv(xt, wt, t), ref.sparse_linear(xt, wt, t), dtype)
    # Every other channel of a wider buffer.
    xs = torch.randn(2, 2 * k, generator=g).to(dtype).to(DEVICE)[:, ::2]
    check_close(tg.sparse_gemv(xs, wt, t), ref.sparse_linear(xs, wt, t), dtype)
    # [batch, seq, K] and a plain vector.
    x3 = torch.randn(2, 2, k, generator=g).to(dtype).to(DEVICE)
    check_close(tg.sparse_gemv(x3, wt, t), ref.sparse_linear(x3, wt, t), dtype)
    x1 = torch.randn(k, generator=g).to(dtype).to(DEVICE)
    check_close(tg.sparse_gemv(x1, wt, t), ref.sparse_linear(x1, wt, t), dtype)


def test_batch_rows_keep_their_own_zeros():
    """The union walk reads a row once for all rows; each row still drops its own inputs."""
    k, n = 64, 40
    x, wt, _ = _inputs(2, k, n, torch.float16, seed=9)
    x[0, :32] = 3.0  # row 0 keeps the first half only
    x[0, 32:] = 0.01
    x[1, :32] = 0.01  # row 1 keeps the second half only
    x[1, 32:] = -2.0
    t = _tensor(0.5)
    y = tg.sparse_gemv(x, wt, t)
    check_close(y, ref.sparse_linear(x, wt, t), torch.float16)
    check_close(y[0], (x[0, :32].float() @ wt[:32].float()).half(), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_compared_in_activation_dtype(dtype):
    """t is rounded to x's dtype first, as torch compares a half tensor with a 0-dim fp32
    tensor (the fused reference): 0.49995 rounds to 0.5, so an input of 0.5 is dropped."""
    k, n = 40, 24
    x, wt, _ = _inputs(1, k, n, dtype, seed=12)
    x[0, ::3] = 0.5
    x[0, 1::3] = -0.5
    t = _tensor([0.49995, 0.5001])
    y = tg.sparse_gemv_fused(x, wt, t, (12, 12))
    r = ref.sparse_linear_fused(x, wt, t, (12, 12))
    check_close(y, r, dtype)
    assert not ref.keep_mask(x, t[0]).any(dim=0)[::3].any()  # the reference drops them too


def _norm_inputs(b, k, dtype, seed):
    g = _gen(seed)
    h = (3 * torch.randn(b, k, generator=g)).to(dtype).to(DEVICE)
    gain = (torch.rand(k, generator=g) + 0.5).to(dtype).to(DEVICE)
    return h, gain


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize(
    "cfg", [None, *CONFIGS[:4], *CONFIGS[-2:]], ids=lambda c: _cfg_id(c) if c else "default"
)
def test_norm_and_residual_fused(dtype, b, cfg):
    """The RMSNorm in front (every program normalises x itself) and the residual add in
    the epilogue against the unfused reference ops."""
    k, splits = 203, (64, 40, 46)
    n = sum(splits)
    h, gain = _norm_inputs(b, k, dtype, seed=b + 40)
    _, wt, s = _inputs(b, k, n, dtype, seed=41, scale=True)
    x = ref.rms_norm(h, gain, 1e-5)
    t = _tensor([_threshold(x, 0.0), _threshold(x, 0.5), _threshold(x, 0.8)])
    y = tg.sparse_gemv_fused(h, wt, t, splits, s, config=cfg, norm=(gain, 1e-5))
    check_close(y, ref.sparse_linear_fused(x, wt, t, splits, s), dtype)
    t2 = _tensor([_threshold(x, 0.3), _threshold(x, 0.6)])
    g = tg.sparse_gate_up_act(h, wt[:, :150], t2, "silu", config=cfg, norm=(gain, 1e-5))
    check_close(g, ref.sparse_gate_up_act(x, wt[:, :150], t2, "silu"), dtype)
    t1 = _tensor([_threshold(x, 0.45)] * 2)  # one shared list
    g = tg.sparse_gate_up_act(h, wt[:, :150], t1, "silu", config=cfg, norm=(gain, 1e-5))
    check_close(g, ref.sparse_gate_up_act(x, wt[:, :150], t1, "silu"), dtype)
    res = torch.randn(b, n, generator=_gen(42)).to(dtype).to(DEVICE)
    y = tg.sparse_gemv_fused(x, wt, t, splits, s, config=cfg, residual=res)
    want = res + ref.sparse_linear_fused(x, wt, t, splits, s)
    check_close(y, want, dtype)


def test_residual_add_rounds_as_two_torch_ops():
    """Output rounded, then the sum rounded: bitwise the unfused ``h + y``."""
    k, n = 96, 80
    x, wt, _ = _inputs(1, k, n, torch.bfloat16, seed=43)
    t = _tensor(_threshold(x, 0.5))
    res = (100 * torch.randn(1, n, generator=_gen(44))).to(torch.bfloat16).to(DEVICE)
    cfg = tg.GemvConfig(block_n=32, rows=16, split_k=1, num_warps=1)
    y = tg.sparse_gemv(x, wt, t, config=cfg)
    assert torch.equal(tg.sparse_gemv_fused(x, wt, t, (n,), config=cfg, residual=res), res + y)


def test_norm_errors_say_what_is_wrong():
    x, wt, _ = _inputs(1, 32, 16, torch.float16)
    t = _tensor(0.1)
    with pytest.raises(ValueError, match="gain"):
        tg.sparse_gemv_fused(x, wt, t, (16,), norm=(torch.ones(31, dtype=x.dtype), 1e-5))
    with pytest.raises(ValueError, match="residual"):
        tg.sparse_gemv_fused(x, wt, t, (16,), residual=torch.ones(1, 15, dtype=x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_step_triton_equals_torch(dtype):
    """A whole decode step with the glue fused into the kernels (triton backend) against
    the model's plain-torch sparse path."""
    from teal.model.build import random_model
    from teal.model.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
        max_seq_len=64,
    )  # fmt: skip
    model = random_model(cfg, dtype=dtype, device=DEVICE, seed=5)
    ids = torch.tensor([[1, 5, 9, 2, 7, 11]], device=DEVICE)
    model.setup_cache(1, 16)
    model(ids[:, :5], torch.arange(5, device=DEVICE))
    step = (ids[:, 5:], torch.tensor([5], device=DEVICE))
    thr = torch.full((cfg.n_layers, 7), 0.3)
    thr[:, 4] = 0.4  # gate and up with different thresholds
    thr[:, 6] = 0.02
    model.set_sparsity(thr, mode="decode")
    model.set_backend("torch")
    want = model(*step)
    model.set_backend("triton")
    got = model(*step)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        check_close(got, want, dtype)
    model.clear_sparsity()


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES])
@pytest.mark.parametrize(
    "heads,window,pos",
    [((4, 2), None, 17), ((4, 4), 5, 33), ((6, 2), 40, 0), ((4, 2), None, 130), ((4, 1), 9, 149)],
)
def test_decode_attention(dtype, heads, window, pos):
    """RoPE, cache write and attention in one kernel against the model's torch ops; the
    caches must end up bitwise equal."""
    from teal.kernels.triton_attention import decode_attention

    # 40 positions: two programs per head; 150: five (a count that is no power of two).
    (hq, hkv), b, d, max_len = heads, 2, 16, 40 if pos < 40 else 150
    g = _gen(pos + hq)
    qkv = torch.randn(b, 1, (hq + 2 * hkv) * d, generator=g).to(dtype).to(DEVICE)
    kc = torch.randn(b, hkv, max_len, d, generator=g).to(dtype).to(DEVICE)
    vc = torch.randn(b, hkv, max_len, d, generator=g).to(dtype).to(DEVICE)
    p = torch.tensor([pos], device=DEVICE)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    emb = (p.float()[:, None] * inv[None]).repeat(1, 2)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    want = ref.decode_attention(qkv, cos, sin, k1, v1, p, hq, hkv, window)
    got = decode_attention(qkv, cos, sin, k2, v2, p, hq, hkv, window)
    assert torch.equal(v1, v2)
    # The roped key: within one rounding (a GPU may fuse the multiply-add).
    check_close(k2, k1, dtype if dtype != torch.float32 else torch.float16)
    others = torch.ones(max_len, dtype=torch.bool, device=DEVICE)
    others[pos] = False
    assert torch.equal(k1[:, :, others], k2[:, :, others])
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        check_close(got, want, dtype)


def test_compiled_block_compiles_once_for_all_layers():
    """The decode block is compiled once and shared by every layer (the engine's
    ``compile="blocks"``): nothing in its traced code may depend on the layer index."""
    from teal.model.build import random_model
    from teal.model.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=64, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
        max_seq_len=64,
    )  # fmt: skip
    model = random_model(cfg, dtype=torch.float32, device=DEVICE, seed=7)
    ids = torch.tensor([[1, 5, 9, 2, 7, 11]], device=DEVICE)
    model.setup_cache(1, 16)
    model(ids[:, :5], torch.arange(5, device=DEVICE))
    model.set_sparsity(torch.full((cfg.n_layers, 7), 0.3), mode="decode")
    model.set_backend("triton")
    model.set_decode_attention("triton")
    torch._dynamo.reset()
    model.decode_blocks = [
        torch.compile(b, fullgraph=True, dynamic=False, backend="aot_eager") for b in model.layers
    ]
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            model(ids[:, 5:], torch.tensor([5], device=DEVICE))
    finally:
        model.decode_blocks = None
        model.set_decode_attention(None)
        model.clear_sparsity()
        torch._dynamo.reset()


def test_model_decode_attention_kernel_equals_torch_ops():
    """A model's decode steps with attention as one kernel against its torch ops, dense
    and sparse (the sparse one with the glue fused into the projections too)."""
    from teal.model.build import random_model
    from teal.model.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
        max_seq_len=64, sliding_windows=(3, None),
    )  # fmt: skip
    model = random_model(cfg, dtype=torch.float32, device=DEVICE, seed=6)
    ids = torch.tensor([[1, 5, 9, 2, 7, 11, 3]], device=DEVICE)
    for sparse in (False, True):
        if sparse:
            model.set_sparsity(torch.full((cfg.n_layers, 7), 0.3), mode="decode")
            model.set_backend("triton")
        outs = []
        for kernel in (None, "triton"):
            model.set_decode_attention(kernel)
            model.setup_cache(1, 16)
            model(ids[:, :5], torch.arange(5, device=DEVICE))
            steps = [model(ids[:, i : i + 1], torch.tensor([i], device=DEVICE)) for i in (5, 6)]
            outs.append((steps, model.layers[1].attention.kv_cache.k.clone()))
        (want, kw), (got, kg) = outs
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kg, kw, rtol=1e-6, atol=1e-6)
    model.set_decode_attention(None)
    model.clear_sparsity()


def test_deterministic():
    x, wt, _ = _inputs(1, 257, 96, torch.bfloat16, seed=4)
    t = _tensor(_threshold(x, 0.5))
    cfg = tg.GemvConfig(block_n=32, rows=16, split_k=6)
    a = tg.sparse_gemv(x, wt, t, config=cfg)
    b = tg.sparse_gemv(x, wt, t, config=cfg)
    assert torch.equal(a, b)


def test_threshold_is_read_on_device():
    """Changing the threshold tensor in place changes the result (CUDA-graph friendly)."""
    x, wt, _ = _inputs(1, 80, 48, torch.float16, seed=8)
    t = _tensor(-1.0)
    check_close(tg.sparse_gemv(x, wt, t), ref.sparse_linear(x, wt, t), torch.float16)
    t.fill_(1e4)
    assert (tg.sparse_gemv(x, wt, t) == 0).all()


def test_errors_say_what_is_wrong():
    x, wt, _ = _inputs(1, 32, 16, torch.float16)
    t = _tensor(0.1)
    with pytest.raises(ValueError, match="rows"):
        tg.sparse_gemv(x, wt.t(), t)
    with pytest.raises(ValueError, match="splits"):
        tg.sparse_gemv_fused(x, wt, _tensor([0.1, 0.1]), (8, 7))
    with pytest.raises(ValueError, match="threshold"):
        tg.sparse_gemv_fused(x, wt, _tensor([0.1, 0.1, 0.1]), (8, 8))
    with pytest.raises(ValueError, match="activation"):
        tg.sparse_gate_up_act(x, wt, _tensor([0.1, 0.1]), "swish")
    with pytest.raises(ValueError, match="dtype"):
        tg.sparse_gemv(x.float(), wt, t)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    x, wt, _ = _inputs(1, 4096, 1024, torch.bfloat16, seed=2)
    t = _tensor(_threshold(x, 0.5))
    tg.prepare(x, wt, t)  # compile and allocate outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = tg.sparse_gemv(x, wt, t)
    for p in (0.5, 0.8, 0.0):
        t.fill_(_threshold(x, p))
        g.replay()
        check_close(y, ref.sparse_linear(x, wt, t), torch.bfloat16)


def test_programmatic_dependent_launch_switch(monkeypatch):
    """PDL only on CUDA GPUs of compute capability 9 and later, never under the
    interpreter; TEAL_PDL=0 turns it off."""
    assert tg.pdl_mode(torch.device("cpu")) is False
    assert tg.pdl_options(False) == {}
    assert tg.pdl_options(True) == {"launch_pdl": True}
    if DEVICE == "cuda":
        dev = torch.device("cuda")
        expect = tg.gdc_wait is not None and torch.cuda.get_device_capability()[0] >= 9
        assert tg.pdl_mode(dev) is expect
        monkeypatch.setenv("TEAL_PDL", "0")
        assert tg.pdl_mode(dev) is False


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("pdl", ["0", "1"])
def test_chained_launches_in_a_graph(monkeypatch, pdl):
    """Each launch reads what the one before wrote (as a decode step does): with
    programmatic dependent launch the second is placed early and must still wait."""
    monkeypatch.setenv("TEAL_PDL", pdl)
    x, w1, _ = _inputs(1, 4096, 2048, torch.bfloat16, seed=21)
    _, w2, _ = _inputs(1, 2048, 4096, torch.bfloat16, seed=22)
    t1, t2 = _tensor(_threshold(x, 0.5)), _tensor(0.0)
    tg.prepare(x, w1, t1)
    tg.prepare(tg.sparse_gemv(x, w1, t1), w2, t2)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y2 = tg.sparse_gemv(tg.sparse_gemv(x, w1, t1), w2, t2)
    for p in (0.5, 0.0, 0.8):
        t1.fill_(_threshold(x, p))
        g.replay()
        y1 = tg.sparse_gemv(x, w1, t1)
        check_close(y1, ref.sparse_linear(x, w1, t1), torch.bfloat16)
        assert torch.equal(y2, tg.sparse_gemv(y1, w2, t2))


@pytest.mark.skipif(DEVICE != "cuda", reason="timing needs a GPU")
def test_tune_pins_a_config():
    x, wt, _ = _inputs(1, 1024, 512, torch.float16, seed=1)
    t = _tensor(_threshold(x, 0.5))
    cands = [tg.GemvConfig(64, 32, 4), tg.GemvConfig(128, 32, 8)]
    best, res = tg.tune(x, wt, t, candidates=cands, rep_ms=5)
    assert best in cands and len(res) == 2
    assert tg.get_config(1024, 512, torch.float16) == best
