"""CPU sparse kernels (native and embedding_bag) against the plain-torch reference, and the
whole model decoding with backend "cpu" against backend "torch".  Speed is measured in
benchmarks/bench_cpu.py and `teal bench`, never here."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from teal.kernels import cpu
from teal.kernels import reference as ref
from teal.model.quant import QuantWeight

IMPLS = ["native", "embedding_bag"]
DTYPES = [torch.float32, torch.bfloat16]
# (K, splits): odd sizes, one input channel, segments that share no divisor but 1.
SHAPES = [(67, (45,)), (1, (33,)), (301, (130, 7, 7)), (96, (64, 32)), (576, (576, 192, 192))]
SPARSITY = [0.0, 0.5, 0.9, 1.0]  # 1.0: the threshold drops every input


@pytest.fixture(scope="module", autouse=True)
def _native_builds():
    """The native kernel must build wherever the tests run (CI has a C++ compiler): a
    silent fallback would leave it untested."""
    assert cpu.implementation() == "native", "the native CPU kernel did not build"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(b, k, n, dtype, seed=0, scale=False):
    g = _gen(seed)
    x = torch.randn(b, k, generator=g).to(dtype)
    wt = (torch.randn(k, n, generator=g) / k**0.5).to(dtype)
    s = (torch.rand(k, generator=g) + 0.5).to(dtype) if scale else None
    return x, wt, s


def _threshold(x, p, scale=None):
    """A threshold dropping about a fraction p of the scores, rounded to a bf16 value so
    the kernel and the reference compare against the same number in any dtype."""
    if p <= 0.0:
        return -1.0
    if p >= 1.0:
        return 1e4
    sc = x.float().abs() if scale is None else (x.abs() * scale.to(x.dtype)).float()
    return float(torch.quantile(sc.flatten(), p).to(torch.bfloat16).float())


def _check(y, r, dtype):
    assert y.shape == r.shape and y.dtype == r.dtype
    y, r = y.float(), r.float()
    assert torch.isfinite(y).all()
    # fp32 accumulation in another order, then one rounding to the output dtype.
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    mag = max(r.abs().max().item(), 1e-3)
    torch.testing.assert_close(y, r, rtol=tol, atol=tol * mag)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,splits", SHAPES)
@pytest.mark.parametrize("p", SPARSITY)
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("use_scale", [False, True])
def test_project_matches_reference(impl, dtype, k, splits, p, b, use_scale):
    x, wt, s = _inputs(b, k, sum(splits), dtype, seed=k + b, scale=use_scale)
    # Each segment its own level (greedy allocation gives q, k, v different thresholds).
    levels = [p] + [min(p + 0.2 * (j + 1), 1.0) if p > 0 else 0.0 for j in range(len(splits) - 1)]
    t = torch.tensor([_threshold(x, q, s) for q in levels])
    y = cpu.sparse_project(x, wt, t, splits, s, impl=impl)
    _check(y, ref.sparse_linear_fused(x, wt, t, splits, s), dtype)
    if p >= 1.0:
        assert (y == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize("act", ["silu", "relu", "relu2", "gelu", "drelu"])
@pytest.mark.parametrize("b", [1, 2])
def test_gate_up_matches_reference(impl, dtype, act, b):
    x, wt, _ = _inputs(b, 75, 2 * 37, dtype, seed=5)
    t = torch.tensor([_threshold(x, 0.4), _threshold(x, 0.7)])
    y = cpu.sparse_gate_up(x, wt, t, act, impl=impl)
    tol_dtype = torch.bfloat16 if dtype != torch.float32 else dtype
    r = ref.sparse_gate_up_act(x, wt, t, act)
    # The reference rounds gate and up to x's dtype before the activation; the kernels
    # keep them in fp32, so compare at the looser tolerance below fp32.
    y, r = y.float(), r.float()
    tol = 2e-2 if tol_dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y, r, rtol=tol, atol=tol * max(r.abs().max().item(), 1e-3))


@pytest.mark.parametrize("impl", IMPLS)
def test_gate_up_all_dropped_and_all_kept(impl):
    x, wt, _ = _inputs(1, 64, 2 * 48, torch.float32, seed=2)
    y = cpu.sparse_gate_up(x, wt, torch.tensor([1e4, 1e4]), "silu", impl=impl)
    assert (y == 0).all()
    y = cpu.sparse_gate_up(x, wt, torch.tensor([-1.0, -1.0]), "silu", impl=impl)
    gu = x @ wt
    _check(y, F.silu(gu[:, :48]) * gu[:, 48:], torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input_and_leading_dims(impl, dtype):
    g = _gen(3)
    big = torch.randn(2, 3, 2 * 81, generator=g).to(dtype)
    x = big[:, 1:2, ::2]  # [2, 1, 81], stride 2 along the channels
    assert not x.is_contiguous()
    wt = (torch.randn(81, 40, generator=g) / 9).to(dtype)
    t = torch.tensor([_threshold(x, 0.5), _threshold(x, 0.3)])
    y = cpu.sparse_project(x, wt, t, (24, 16), impl=impl)
    assert y.shape == (2, 1, 40)
    _check(y, ref.sparse_linear_fused(x.contiguous(), wt, t, (24, 16)), dtype)
    xt = torch.randn(81, 2, generator=g).to(dtype).t()  # transposed view
    y = cpu.sparse_project(xt, wt, t[:1], (40,), impl=impl)
    _check(y, ref.sparse_linear(xt.contiguous(), wt, t[0]), dtype)


def test_batch_rows_keep_their_own_channels():
    x = torch.zeros(2, 64)
    x[0, :32] = 3.0  # row 0 keeps the first half only
    x[1, 32:] = 3.0
    x[1, :32] = 0.01
    wt = torch.randn(64, 16, generator=_gen(4))
    for impl in IMPLS:
        y = cpu.sparse_project(x, wt, torch.tensor([0.5]), (16,), impl=impl)
        _check(y[0], x[0, :32] @ wt[:32], torch.float32)
        _check(y[1], x[1, 32:] @ wt[32:], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_compared_in_activation_dtype(dtype):
    """As the reference: t is rounded to x's dtype first (0.49995 rounds to 0.5 in bf16),
    so an input of exactly 0.5 is dropped there."""
    x, wt, _ = _inputs(1, 40, 24, dtype, seed=12)
    x[0, ::3] = 0.5
    t = torch.tensor([0.49995, 0.5001])
    for impl in IMPLS:
        y = cpu.sparse_project(x, wt, t, (12, 12), impl=impl)
        _check(y, ref.sparse_linear_fused(x, wt, t, (12, 12)), dtype)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
def test_dense_linear_matches_torch(dtype, rows):
    g = _gen(6)
    x = torch.randn(rows, 1, 131, generator=g).to(dtype)
    w = (torch.randn(517, 131, generator=g) / 11).to(dtype)
    _check(cpu.linear(x, w), F.linear(x.float(), w.float()).to(dtype), dtype)


def test_errors_say_what_is_wrong():
    x, wt, _ = _inputs(1, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="splits"):
        cpu.sparse_project(x, wt, torch.tensor([0.1, 0.1]), (8, 7))
    with pytest.raises(ValueError, match="channels"):
        cpu.sparse_project(x[:, :31], wt, torch.tensor([0.1]), (16,))
    with pytest.raises(ValueError, match="contiguous"):
        cpu.sparse_project(x, wt.t().contiguous().t(), torch.tensor([0.1]), (16,))
    with pytest.raises(ValueError, match="activation"):
        cpu.sparse_gate_up(x, wt, torch.tensor([0.1, 0.1]), "swish")


def test_threads_do_not_change_results():
    x, wt, _ = _inputs(2, 301, 130, torch.float32, seed=9)
    t = torch.tensor([_threshold(x, 0.5)])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = cpu.sparse_project(x, wt, t, (130,))
        torch.set_num_threads(max(2, old))
        b = cpu.sparse_project(x, wt, t, (130,))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_vector_width_gives_the_same_results(tmp_path, monkeypatch):
    """The kernel is built for the widest vectors torch finds on this CPU (AVX-512, AVX2,
    or plain C++); a narrower build, asked for with TEAL_CPU_ISA, must agree on every
    kernel.  AVX2 and AVX-512 give the same bits (each column sees the same FMAs in the
    same order, whatever the width); plain C++ rounds each product (no FMA), so it agrees
    within rounding.  One process loads one build, hence subprocesses."""
    import os
    import subprocess

    from helpers_isa import outputs

    here = cpu.isa()
    widths = cpu.ISAS[: cpu.ISAS.index(here)]
    if not widths:
        pytest.skip("the kernel is built without vector instructions here: nothing to compare")
    want = outputs()
    helper = Path(__file__).with_name("helpers_isa.py")
    for width in widths:
        path = tmp_path / f"{width}.pt"
        env = {**os.environ, "TEAL_CPU_ISA": width}
        proc = subprocess.run([sys.executable, str(helper), str(path)], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = torch.load(path)
        assert got["isa"] == width
        assert got["outputs"].keys() == want.keys()
        for name, y in want.items():
            if width == "generic":
                _check(
                    got["outputs"][name], y, torch.bfloat16 if y.dtype != torch.float32 else y.dtype
                )
            else:
                assert torch.equal(got["outputs"][name], y), f"{name}: {width} differs from {here}"
    monkeypatch.setenv("TEAL_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="TEAL_CPU_ISA") as bad:
        cpu.isa()
    from teal.errors import TealError

    assert isinstance(bad.value, TealError)  # the CLI prints it on one line, exit 2
    monkeypatch.setenv("TEAL_CPU_ISA", "generic")
    assert cpu.isa() == "generic" and "-mavx2" not in cpu._compile_flags()


# ----- the whole model ---------------------------------------------------------------------


def _tiny_model(dtype=torch.float32, window=None, act="silu"):
    from teal.model.build import random_model
    from teal.model.config import PRESETS

    cfg = PRESETS["default"].replace(
        dim=96,
        n_layers=3,
        n_heads=3,
        n_kv_heads=1,
        head_dim=32,
        ffn_dim=160,
        vocab_size=211,
        sliding_windows=(window,) * 3,
        act=act,
    )
    return random_model(cfg, dtype=dtype, seed=1)


def _calibrated(model, p):
    from teal.sparsity.stats import collect_stats

    ids = torch.randint(0, model.config.vocab_size, (256,), generator=_gen(1))
    return collect_stats(model, ids, seq_len=64, progress=False).thresholds(p)


@pytest.mark.parametrize("dtype,act", [(d, "silu") for d in DTYPES] + [(torch.float32, "drelu")])
def test_model_decodes_the_same_with_cpu_and_torch_backends(dtype, act):
    model = _tiny_model(dtype, act=act)
    model.set_sparsity(_calibrated(model, 0.5), mode="decode")
    prompt = torch.randint(0, 211, (1, 7), generator=_gen(2))
    runs = {}
    for backend in ("torch", "cpu"):
        model.set_backend(backend)
        model.setup_cache(1, 32)
        with torch.inference_mode():
            logits = model(prompt, torch.arange(7))
            tok = logits[:, -1].argmax(-1)
            toks, steps = [int(tok)], []
            for i in range(12):
                logits = model(tok.view(1, 1), torch.tensor([7 + i]))
                steps.append(logits.float())
                tok = logits[:, -1].argmax(-1)
                toks.append(int(tok))
        runs[backend] = (toks, steps)
    ref_toks, ref_logits = runs["torch"]
    toks, logits = runs["cpu"]
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    # Logits of the first decode step come from identical inputs: they must agree.
    mag = ref_logits[0].abs().max().item()
    torch.testing.assert_close(logits[0], ref_logits[0], rtol=tol, atol=tol * mag)
    if dtype == torch.float32:
        assert toks == ref_toks
        for a, r in zip(logits, ref_logits):
            torch.testing.assert_close(a, r, rtol=tol, atol=tol * mag)
    else:  # bf16 rounding may flip a near tie late in the run, not early
        assert toks[:6] == ref_toks[:6]


def test_bench_decode_reports_every_row(monkeypatch):
    from teal.bench import bench_decode, format_table

    model = _tiny_model()
    model.set_backend("cpu")
    # Which thresholds each one-call native step ran with: the dense-matmul row must run
    # none (the torch path), the kernel row at p = 0 the keep-all ones.
    seen = []
    blocks = cpu.DecodeGlue.blocks
    monkeypatch.setattr(
        cpu.DecodeGlue, "blocks", lambda self, b, h, c, s, thr, sc: seen.append(thr.clone())
        or blocks(self, b, h, c, s, thr, sc),
    )  # fmt: skip
    result = bench_decode(
        model, sparsities=[0, 0.5], new_tokens=6, threads=1, repeats=1, progress=False
    )
    assert model.sparse_backend == "cpu"  # restored
    # The kernel rows ran natively (p = 0 with the bench's -1 thresholds, p = 0.5 with
    # calibrated ones); the dense-matmul row never did (it would pass model.keep_all).
    assert any(bool((t == -1).all()) for t in seen) and any(bool((t > 0).any()) for t in seen)
    assert not any(bool(torch.isinf(t).any()) for t in seen)
    json.dumps(result)  # JSON-able
    for key in ("device", "model", "dtype", "quant", "method", "threads", "torch", "date"):
        assert key in result
    assert result["threads"] == 1 and result["dtype"] == "fp32" and result["quant"] is None
    paths = [(r["sparsity"], r["path"]) for r in result["results"]]
    assert paths == [(0.0, "dense-matmul"), (0.0, "cpu-kernel"), (0.5, "cpu-kernel")]
    sparse = result["results"][-1]
    assert sparse["dense_projections"] == [] and sparse["tokens_per_second"] > 0
    # Thresholds calibrated on the model itself: the measured sparsity is near the target.
    assert abs(sparse["measured_sparsity"] - 0.5) < 0.15
    assert "cpu-kernel" in format_table(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_cli_without_a_gpu_says_so(capsys):
    from teal.cli import main

    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_bench_replay_counts_sparsity_on_the_recorded_tokens():
    """The measured sparsity is counted by an eager replay fed with the timed row's
    tokens (a graph-replaying engine calls no observer); on the CPU loop the replay
    must choose the same tokens, and a wrong token list is caught."""
    from teal.bench import CpuEngine, _replay, count_dropped

    model = _tiny_model()
    prompt = torch.tensor([[1, 2, 3]])
    engine = CpuEngine(model, 3 + 8)
    thr = torch.full((model.config.n_layers, 7), 0.5)
    model.set_sparsity(thr, mode="decode")
    model.set_backend("cpu")
    tokens, _ = engine.generate(prompt, 8)
    with count_dropped(model, thr) as share:
        _replay(model, prompt, tokens, engine)
    assert 0.0 < share() < 1.0
    wrong = tokens[:3] + [(t + 1) % model.config.vocab_size for t in tokens[3:]]
    with pytest.raises(RuntimeError, match="other tokens"):
        _replay(model, prompt, wrong, engine)
    model.clear_sparsity()


def test_bench_cli_runs_a_tiny_preset(tmp_path, monkeypatch, capsys):
    """`teal bench --threads N --json` on a random model (the loader is swapped for a
    tiny one so the test takes seconds) reports the threads it was given."""
    from teal.cli import main
    from teal.commands import bench as bench_cmd

    monkeypatch.setattr(bench_cmd, "load_for_bench", lambda args: (_tiny_model(), "tiny"))
    out = tmp_path / "r.json"
    rc = main(["bench", "--preset", "llama-2-7b", "--sparsity", "0,0.4", "--new-tokens", "4",
               "--repeats", "1", "--threads", "1", "--json", "--out", str(out)])  # fmt: skip
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["threads"] == 1 and obj["model"] == "tiny"
    assert json.loads(out.read_text())["results"] == obj["results"]


def test_cpu_backend_on_many_positions_matches_the_reference():
    """Mode "all" on a prompt (many rows per call) through the CPU kernels.  The
    threshold drops a real share of channels (checked against dense below); the
    two paths may differ only by accumulation order, which can flip a channel sitting
    on its threshold, so the comparison is per position and most must agree closely.
    (On a deep model such flips compound: the fp32 and fp64 references of the default
    model differ as much as this path does, so only a small model pins equality.)"""
    model = _tiny_model()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3)
    )
    model.set_sparsity(torch.full((model.config.n_layers, 7), 0.3), mode="all")
    model.set_backend("torch")
    ref_logits = model(ids)
    model.set_backend("cpu")
    got = model(ids)
    model.clear_sparsity()
    err = (got - ref_logits).abs().amax(-1).flatten()
    assert (err < 1e-4 * ref_logits.abs().max()).float().mean() >= 0.9
    dense = model(ids)
    assert (dense - ref_logits).abs().max() > 1e-3  # the thresholds did drop channels


# ----- the native decode-step glue (norms, attention) ---------------------------------------

GLUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", GLUE_DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_native_rms_norm_matches_the_model(dtype, rows):
    from teal.model.decoder import RMSNorm

    norm = RMSNorm(75, 1e-5).to(dtype)
    g = _gen(4)
    norm.weight.data = torch.randn(75, generator=g).to(dtype)
    x = (torch.randn(rows, 1, 75, generator=g) * 3).to(dtype)
    with torch.no_grad():
        want = norm(x)
    got = cpu.rms_norm(x, norm.weight.detach(), 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    # Same roundings as the torch ops; only the fp32 sum of squares may differ in order.
    ulp = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp)


def _attention_reference(qkv, cos, sin, k_cache, v_cache, pos, window, h, hkv):
    """The model's torch path for one decode step: split, RoPE, cache write, SDPA."""
    from teal.model.decoder import apply_rope

    b, _, width = qkv.shape
    d = width // (h + 2 * hkv)
    q, k, v = qkv.split((h * d, hkv * d, hkv * d), dim=-1)
    q = apply_rope(q.reshape(b, 1, h, d).transpose(1, 2), cos, sin)
    k = apply_rope(k.reshape(b, 1, hkv, d).transpose(1, 2), cos, sin)
    v = v.reshape(b, 1, hkv, d).transpose(1, 2)
    k_cache[:, :, pos] = k[:, :, 0]
    v_cache[:, :, pos] = v[:, :, 0]
    slots = torch.arange(k_cache.shape[2])
    mask = slots <= pos
    if window is not None:
        mask = mask & (slots > pos - window)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[None],
                                         enable_gqa=h != hkv)  # fmt: skip
    return out.transpose(1, 2).reshape(b, 1, h * d)


@pytest.mark.parametrize("dtype", GLUE_DTYPES)
@pytest.mark.parametrize(
    "b,h,hkv,d,length,pos,window",
    [
        (1, 4, 2, 16, 10, 0, None),  # the first slot: attends to itself only
        (1, 9, 3, 64, 40, 39, None),  # the last slot of the cache
        (2, 3, 3, 8, 12, 7, None),  # no GQA, two rows
        (1, 6, 2, 32, 300, 257, 64),  # sliding window, long cache (threads engage)
        (2, 4, 1, 16, 20, 3, 8),  # window longer than the filled prefix
    ],
)
def test_native_decode_attention_matches_the_torch_path(dtype, b, h, hkv, d, length, pos,
                                                        window):  # fmt: skip
    g = _gen(5)
    # qkv as a slice of a wider buffer: rows not contiguous, as a fused projection's
    # output may be.
    wide = torch.randn(b, 1, (h + 2 * hkv) * d + 5, generator=g).to(dtype)
    qkv = wide[..., : (h + 2 * hkv) * d]
    ang = torch.rand(1, d // 2, generator=g) * 6
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    k_cache = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    v_cache = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = _attention_reference(qkv, cos, sin, k_ref, v_ref, pos, window, h, hkv)
    got = cpu.decode_attention(qkv, cos, sin, k_cache, v_cache, pos, window, h, hkv)
    # The cache write is the same rounded RoPE, bit for bit; slots other than pos untouched.
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # Attention: fp32 softmax in another order, one rounding to the dtype.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_native_decode_attention_refuses_what_it_cannot_take():
    q = torch.zeros(1, 1, 4 * 8)
    cache = torch.zeros(1, 1, 5, 8)
    trig = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="decode_attention"):  # width != (2 + 2) * 8
        cpu.decode_attention(q[..., :24], trig, trig, cache, cache.clone(), 0, None, 2, 1)
    with pytest.raises(ValueError, match="decode_attention"):  # slot beyond the cache
        cpu.decode_attention(q, trig, trig, cache, cache.clone(), 5, None, 2, 1)
    with pytest.raises(ValueError, match="decode_attention"):  # mixed dtypes
        cpu.decode_attention(q, trig, trig, cache.double(), cache.clone(), 0, None, 2, 1)


@pytest.mark.parametrize("window", [None, 5])
def test_model_decode_glue_equals_the_torch_glue(window, monkeypatch):
    """Backend "cpu" runs a decode step's norms and attention natively; greedy tokens and
    logits (fp32) equal those of the model's torch ops over a run longer than the
    sliding window."""
    import teal.model.decoder as decoder

    model = _tiny_model(window=window)
    model.set_backend("cpu")
    prompt = torch.randint(0, 211, (1, 4), generator=_gen(6))
    runs = []
    for glue in (True, False):
        if not glue:
            monkeypatch.setattr(decoder, "decode_glue", lambda backend, h, pos: None)
        model.setup_cache(1, 24)
        with torch.inference_mode():
            tok = model(prompt, torch.arange(4))[:, -1].argmax(-1)
            toks, logits = [], []
            for i in range(16):
                out = model(tok.view(1, 1), torch.tensor([4 + i]))
                logits.append(out)
                tok = out[:, -1].argmax(-1)
                toks.append(int(tok))
        runs.append((toks, torch.cat(logits)))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-4)
    assert cpu.decode_glue_available(torch.zeros(1, 1, 96))


def _fused_and_op_by_op(model, prompt, steps, monkeypatch):
    """Greedy decode twice on backend "cpu": every block in one native call, then op by
    op (``DecodeGlue.blocks`` declining); logits of every step from both."""
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(cpu.DecodeGlue, "blocks", lambda *args: None)
        b, n = prompt.shape
        model.setup_cache(b, n + steps)
        with torch.inference_mode():
            tok = model(prompt, torch.arange(n))[:, -1].argmax(-1)
            logits = []
            for i in range(steps):
                out = model(tok.view(b, 1), torch.tensor([n + i]))
                logits.append(out)
                tok = out[:, -1].argmax(-1)
        runs.append(torch.cat(logits, dim=1))
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["plain", "window+bias", "scales", "two rows"])
def test_fused_native_block_is_bit_identical_to_op_by_op(dtype, variant, monkeypatch):
    """The one-call block runs the same kernels in the same order with the same roundings
    as the op-by-op path (itself tested against the torch reference above): equal bits."""
    from teal.model.build import random_model

    cfg = _tiny_model().config
    if variant == "window+bias":
        cfg = cfg.replace(sliding_windows=(4,) * 3, qkv_bias=True)
    model = random_model(cfg, dtype=dtype, seed=2)
    if variant == "window+bias":
        for block in model.layers:
            block.attention.bqkv.data.normal_(0, 0.5)
    scales = None
    if variant == "scales":
        g = _gen(7)
        widths = {"attn_in": 96, "attn_out": 96, "mlp_in": 96, "mlp_mid": 160}
        scales = [{s: torch.rand(k, generator=g) + 0.5 for s, k in widths.items()}] * 3
    model.set_sparsity(_calibrated(model, 0.5), mode="decode", scales=scales)
    model.set_backend("cpu")
    rows = 2 if variant == "two rows" else 1
    prompt = torch.randint(0, 211, (rows, 5), generator=_gen(8))
    assert cpu._PLANS.get(model.layers) is None
    fused, op_by_op = _fused_and_op_by_op(model, prompt, 10, monkeypatch)
    assert torch.equal(fused, op_by_op)
    assert cpu._PLANS[model.layers].plans is not None  # the one-call step did run


def _decode_logits(model, prompt, steps):
    n = prompt.shape[1]
    if model.cache_len != n + steps:  # else reused: a new cache alone would re-make plans
        model.setup_cache(1, n + steps)
    with torch.inference_mode():
        tok = model(prompt, torch.arange(n))[:, -1].argmax(-1)
        out = []
        for i in range(steps):
            out.append(model(tok.view(1, 1), torch.tensor([n + i])))
            tok = out[-1][:, -1].argmax(-1)
    return torch.cat(out, dim=1)


def test_one_call_step_notices_what_changed_under_its_plans(monkeypatch):
    """The step's cached plans point into weights, caches and fp32 copies of the
    thresholds: editing the thresholds in place, swapping a weight's ``.data``, assigning
    a new weight or quantizing must each be seen (the result then equals a fresh op-by-op
    run), never served from stale plans."""
    model = _tiny_model()
    model.set_sparsity(_calibrated(model, 0.5), mode="decode")
    model.set_backend("cpu")
    prompt = torch.randint(0, 211, (1, 5), generator=_gen(9))

    def op_by_op():
        with monkeypatch.context() as m:
            m.setattr(cpu.DecodeGlue, "blocks", lambda *args: None)
            return _decode_logits(model, prompt, 6)

    def check():
        got = _decode_logits(model, prompt, 6)
        assert cpu._PLANS[model.layers].plans is not None
        torch.testing.assert_close(got, op_by_op(), rtol=1e-5, atol=1e-5)
        return got

    first = check()
    with torch.no_grad():
        model.thresholds.mul_(0.5)  # in place: same tensor, new version
    assert not torch.equal(check(), first)
    # Scales in float64: the plans point to fp32 copies, which an in-place edit outdates.
    g = _gen(10)
    widths = {"attn_in": 96, "attn_out": 96, "mlp_in": 96, "mlp_mid": 160}
    scales = [{s: torch.rand(k, generator=g, dtype=torch.float64) + 0.5 for s, k in
               widths.items()} for _ in range(3)]  # fmt: skip
    model.set_sparsity(model.thresholds.clone(), mode="decode", scales=scales)
    before = check()
    scales[1]["mlp_mid"].mul_(4)
    assert not torch.equal(check(), before)
    w = model.layers[1].mlp.w_down
    w.data = w.data * 2  # same Parameter, new storage
    check()
    model.layers[2].attention.wo = torch.nn.Parameter(model.layers[2].attention.wo * -1)
    check()
    model.quantize("int4", group_size=32, lm_head=False)  # new weights: new plans
    check()
    assert cpu._PLANS[model.layers].plans[0].wfmt == 2


def test_fused_block_declines_what_it_does_not_run():
    model = _tiny_model()
    block = model.layers[0]
    thr = torch.zeros(7)
    assert cpu._plan_inputs(block, thr, None) is None  # no cache yet
    model.setup_cache(1, 8)
    assert cpu._plan_inputs(block, thr, None) is not None
    assert cpu._plan_inputs(block, thr, {"mlp_cats": torch.ones(1)}) is None  # CATS
    model.quantize("int4", group_size=32, lm_head=False)
    assert cpu._plan_inputs(model.layers[0], thr, None) is not None  # int4 runs fused
    from teal.model.quant import quantize_int8

    mlp = model.layers[0].mlp
    mlp.w_down = quantize_int8(mlp.w_down.dequantize(torch.float32))
    assert cpu._plan_inputs(model.layers[0], thr, None) is None  # int8 beside int4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are a Linux feature")
def test_place_weights_moves_weights_without_changing_them():
    """set_backend("cpu") moves the 2-D weights into huge-page buffers (one per block):
    same values, cache-line aligned, a block's weights sharing one storage; done once."""
    model = _tiny_model()
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    ids = torch.randint(0, 211, (1, 6), generator=_gen(9))
    want = model(ids)
    model.set_backend("cpu")
    assert cpu.place_weights(model) is False  # already placed: idempotent
    for name, q in model.named_parameters():
        assert torch.equal(q, before[name]), name
        if q.dim() == 2:
            assert q.data_ptr() % 64 == 0 and q.is_contiguous(), name
    block = model.layers[1]
    storages = {q.untyped_storage().data_ptr() for q in (block.attention.wqkv, block.mlp.w_down)}
    assert len(storages) == 1
    model.set_backend("torch")
    torch.testing.assert_close(model(ids), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_decode_on_the_cpu_backend_runs_the_native_step(dtype):
    """With sparsity off, a one-token step on backend "cpu" runs the one-call native step
    keeping every channel; its logits equal the torch path's (backend "torch") up to the
    order of the fp32 sums, and greedy tokens agree."""
    model = _tiny_model(dtype)
    prompt = torch.randint(0, 211, (1, 5), generator=_gen(11))
    runs = []
    for backend in ("cpu", "torch"):
        model.set_backend(backend)
        model.setup_cache(1, 5 + 12)  # a new cache for each run
        runs.append(_decode_logits(model, prompt, 12))
        plans = cpu._PLANS.get(model.layers)
        if backend == "cpu":
            assert plans is not None and plans.plans is not None
            assert torch.isinf(plans.sources[0]).all()  # the keep-all thresholds
    native, torch_path = runs
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(native.float(), torch_path.float(), rtol=tol, atol=tol)
    assert torch.equal(native.argmax(-1), torch_path.argmax(-1))


# ----- quantized weights on the CPU ----------------------------------------------------


def _quantized(kind, w, splits, dtype):
    """``kind``: int8, or int4-<zero kind>[-fp16] (groups of 32; fp16 scales as GGUF's)."""
    from teal.model.quant import quantize_int4, quantize_int8

    if kind == "int8":
        return quantize_int8(w, splits)
    parts = kind.split("-")
    scale_dtype = torch.float16 if parts[-1] == "fp16" else dtype
    return quantize_int4(w, 32, splits, zero_point=parts[1], scale_dtype=scale_dtype)


QUANT_KINDS = ["int8", "int4-code", "int4-offset", "int4-none", "int4-offset-fp16",
               "int4-none-fp16"]  # fmt: skip


@pytest.mark.parametrize("kind", QUANT_KINDS)
@pytest.mark.parametrize("k,splits", [(67, (46,)), (130, (32, 16, 18))])
@pytest.mark.parametrize("p", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("b,dtype", [(1, torch.bfloat16), (1, torch.float32), (3, torch.float16)])
def test_native_quant_project_matches_dequantize_then_matmul(kind, k, splits, p, b, dtype):
    """int8 codes walked as rows, per-column scales on the sums; int4 codes summed per
    group, then scaled and offset: the reference (dequantize, then the sparse reference)
    up to fp32 order and one rounding; odd K (a ragged last group), fused segments, a
    non-contiguous batch, every channel dropped."""
    from helpers_kernels import check_close

    w = torch.randn(k, sum(splits), generator=_gen(k)) / k**0.5
    qw = _quantized(kind, w, splits, dtype)
    x = torch.randn(b, 2 * k, generator=_gen(b)).to(dtype)[:, ::2]  # strided rows
    if p is None:
        t = None
    elif p >= 1.0:
        t = torch.full((len(splits),), 1e4)
    else:
        t = torch.full((len(splits),), float(x.float().abs().flatten().quantile(p)))
    y = cpu.quant_project(x, qw, t, splits)
    wf = qw.dequantize(torch.float32)
    r = (x.float() @ wf).to(dtype) if t is None else ref.sparse_linear_fused(x, wf, t, splits)
    check_close(y, r, dtype)
    if p == 1.0:
        assert (y == 0).all()


@pytest.mark.parametrize("kind", ["int8", "int4-code", "int4-offset-fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_quant_gate_up_matches_reference(kind, dtype):
    from helpers_kernels import check_close

    f, k = 24, 70
    qw = _quantized(kind, torch.randn(k, 2 * f, generator=_gen(5)) / k**0.5, (f, f), dtype)
    x = torch.randn(1, k, generator=_gen(6)).to(dtype)
    score = torch.rand(k, generator=_gen(7)) + 0.5
    t = torch.tensor([0.4, 0.9])
    y = cpu.quant_project(x, qw, t, (f, f), score, "silu")
    r = ref.sparse_gate_up_act(x, qw.dequantize(torch.float32), t, "silu", score)
    check_close(y, r, dtype)


@pytest.mark.parametrize("fmt,zero", [("int8", True), ("int4", "code"), ("int4", "offset")])
def test_quantized_model_decodes_natively_on_the_cpu(monkeypatch, fmt, zero):
    """An int8 / int4 model on backend "cpu": the one-call step runs (codes in the plans)
    and equals the op-by-op path (the same kernels through the dispatcher) bit for bit;
    both agree with the torch backend (dequantize, then matmul) within rounding, and a
    dense step and the quantized lm_head run natively too."""
    from teal.kernels import dispatch

    model = _tiny_model()
    model.set_sparsity(_calibrated(model, 0.5), mode="decode")
    # int4 packs two output columns per byte: the odd vocabulary (211) keeps a float head.
    model.quantize(fmt, group_size=32, zero_point=zero, lm_head=fmt == "int8")
    model.set_backend("cpu")
    prompt = torch.randint(0, 211, (1, 5), generator=_gen(12))
    fused, op_by_op = _fused_and_op_by_op(model, prompt, 8, monkeypatch)
    assert torch.equal(fused, op_by_op)
    monkeypatch.undo()
    got = _decode_logits(model, prompt, 8)
    assert cpu._PLANS[model.layers].plans is not None
    assert cpu._PLANS[model.layers].plans[0].wfmt == {"int8": 1, "int4": 2}[fmt]
    model.set_backend("torch")
    want = _decode_logits(model, prompt, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Dense: the keep-all step and the native quantized head (never a dequantized matrix).
    model.clear_sparsity()
    model.set_backend("cpu")
    calls = []
    for w in (model.layers[1].mlp.w_gate_up, model.lm_head):
        if isinstance(w, QuantWeight):
            dequantize = w.dequantize
            monkeypatch.setattr(w, "dequantize", lambda *a, d=dequantize: calls.append(a) or d(*a))
    dense = _decode_logits(model, prompt, 4)
    # The prefill's rows only, not the four one-token steps.
    assert len(calls) == (2 if fmt == "int8" else 1)
    assert torch.isinf(cpu._PLANS[model.layers].sources[0]).all()
    model.set_backend("torch")
    monkeypatch.undo()
    torch.testing.assert_close(dense, _decode_logits(model, prompt, 4), rtol=1e-4, atol=1e-4)
    assert dispatch._quant_kernel(torch.zeros(1, 96), model.layers[0].mlp.w_down, None) is None
