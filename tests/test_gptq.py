"""GPTQ rounding (teal.model.gptq): the same grid as round-to-nearest, less output error
under correlated inputs, and a quantized model built with it."""

import pytest
import torch

from teal.model.build import random_model
from teal.model.config import ModelConfig
from teal.model.gptq import collect_hessians, gptq
from teal.model.quant import quantize_int4, quantize_int8, unpack_int4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _codes(qw):
    return qw.qweight if qw.fmt == "int8" else unpack_int4(qw.qweight, qw.splits)


@pytest.mark.parametrize(
    "fmt,g,zero",
    [("int8", 0, None), ("int4", 32, "code"), ("int4", 16, "offset"), ("int4", 32, "none")],
)
def test_uncorrelated_inputs_round_to_nearest(fmt, g, zero):
    """With H = I no error moves between channels: the codes are round-to-nearest's."""
    k, n = 75, 24  # K not a multiple of the group size
    w = torch.randn(k, n, generator=_gen(0)) * 0.05
    qw = gptq(w, torch.eye(k), fmt, g, (16, 8), zero or "code")
    rtn = quantize_int8(w, (16, 8)) if fmt == "int8" else quantize_int4(w, g, (16, 8), zero)
    assert torch.equal(_codes(qw), _codes(rtn))
    assert torch.equal(qw.scales, rtn.scales)
    assert qw.zero == rtn.zero if fmt == "int4" else qw.zeros is None


@pytest.mark.parametrize("fmt,g", [("int8", 0), ("int4", 32), ("int4", 128)])
def test_less_output_error_than_round_to_nearest(fmt, g):
    """Inputs with correlated channels (and a few large ones, as activations have):
    ``||X (W_q - W)||`` is what GPTQ minimises, and it ends well below RTN's."""
    k, n, m = 256, 64, 2048
    mix = torch.randn(k, k, generator=_gen(1)) / k**0.5 + torch.eye(k)
    x = torch.randn(m, k, generator=_gen(2)) @ mix
    x[:, :8] *= 10.0
    w = torch.randn(k, n, generator=_gen(3)) * 0.05
    h = x.t() @ x / m
    ours = gptq(w, h, fmt, g, None, "code")
    rtn = quantize_int8(w) if fmt == "int8" else quantize_int4(w, g)
    err_ours = float((x @ (ours.dequantize() - w)).norm())
    err_rtn = float((x @ (rtn.dequantize() - w)).norm())
    assert err_ours < 0.8 * err_rtn
    # The grid is the same: every code in range, scales from the same rule.
    codes = _codes(ours).int()
    assert int(codes.min()) >= (-127 if fmt == "int8" else 0)
    assert int(codes.max()) <= (127 if fmt == "int8" else 15)


def test_dead_channel_is_rounded_to_nearest():
    k, n = 64, 16
    x = torch.randn(512, k, generator=_gen(4))
    x[:, 5] = 0.0  # never active in the calibration text
    w = torch.randn(k, n, generator=_gen(5))
    qw = gptq(w, x.t() @ x / 512, "int8")
    assert torch.isfinite(qw.dequantize()).all()
    rtn = quantize_int8(w)
    assert torch.equal(qw.qweight[5], rtn.qweight[5])


def test_errors_say_what_is_wrong():
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="H must be"):
        gptq(w, torch.eye(7), "int8")
    with pytest.raises(ValueError, match="int8 or int4"):
        gptq(w, torch.eye(8), "int3")


CFG = ModelConfig(
    vocab_size=96,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=96,
    max_seq_len=64,
)


def test_quantized_model_with_gptq():
    model = random_model(CFG, dtype=torch.float32, seed=1)
    ids = torch.randint(0, CFG.vocab_size, (256,), generator=_gen(6))
    h = collect_hessians(model, ids, seq_len=64)
    assert set(h) == {
        (i, s) for i in range(2) for s in ("attn_in", "attn_out", "mlp_in", "mlp_mid")
    }
    assert h[(0, "mlp_mid")].shape == (96, 96)
    assert torch.allclose(h[(1, "attn_in")], h[(1, "attn_in")].t())
    dense = model(ids[None, :32])
    q = random_model(CFG, dtype=torch.float32, seed=1)
    qc = q.quantize("int4", group_size=32, hessians=h)
    assert qc.label() == "int4-g32-gptq" and qc.source == "gptq"
    out = q(ids[None, :32])
    assert torch.isfinite(out).all()
    assert float((out - dense).norm() / dense.norm()) < 0.2
    with pytest.raises(ValueError, match="no GPTQ statistics"):
        random_model(CFG, dtype=torch.float32, seed=1).quantize("int8", hessians={})


def test_statistics_of_sparsified_inputs():
    """``thresholds``: H is the mean of the dense second moment and that of each
    (level, projection)'s sparsified input, masked as the model masks."""
    from teal.kernels.reference import sparsify
    from teal.model.decoder import SITE_PROJECTIONS
    from teal.sparsity.stats import dense_pass, windows

    model = random_model(CFG, dtype=torch.float32, seed=1)
    ids = torch.randint(0, CFG.vocab_size, (128,), generator=_gen(7))
    dense = collect_hessians(model, ids, seq_len=64)
    n = CFG.n_layers
    keep_all = torch.full((n, 7), -1.0)
    assert all(
        torch.allclose(a, dense[k], atol=1e-6)
        for k, a in collect_hessians(model, ids, seq_len=64, thresholds=[keep_all]).items()
    )
    drop_all = torch.full((n, 7), float("inf"))
    h = collect_hessians(model, ids, seq_len=64, thresholds=[drop_all])
    for (layer, site), a in h.items():
        assert torch.allclose(a * (1 + len(SITE_PROJECTIONS[site])), dense[(layer, site)])
    # A real table, against the statistics computed here from the observed inputs.
    table = torch.rand(n, 7, generator=_gen(8))
    got = collect_hessians(model, ids, seq_len=64, per_token=False, thresholds=[table, table / 2])
    want, count = {}, [0]

    def observe(layer, site, x, pos_mask):
        x = x.reshape(-1, x.shape[-1])
        views = [x] + [sparsify(x, t[layer, j]) for t in (table, table / 2)
                       for j in SITE_PROJECTIONS[site]]  # fmt: skip
        m = sum(v.t() @ v for v in views) / len(views)
        want[(layer, site)] = want.get((layer, site), 0) + m
        count[0] += x.shape[0] if (layer, site) == (n - 1, "mlp_mid") else 0

    dense_pass(model, list(windows(ids, 64, None)), observe, (n - 1, "mlp_mid"))
    for k, a in got.items():
        assert not torch.allclose(a, dense[k])
        torch.testing.assert_close(a, want[k] / count[0], rtol=1e-4, atol=1e-5)
