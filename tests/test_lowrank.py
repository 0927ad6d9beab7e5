"""The low-rank split of the MLP input (teal.model.lowrank): exactness, what the site
sees, calibration, the byte accounting, and the paths that run it."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers_models import TINY
from teal.errors import TealError
from teal.eval.perplexity import SparsityMeter
from teal.kernels import reference
from teal.model import lowrank as lr
from teal.model.build import random_model
from teal.model.config import ModelConfig
from teal.sparsity import allocate
from teal.sparsity.artifact import Calibration
from teal.sparsity.calibrate import calibrate
from teal.sparsity.methods import setting_for
from teal.sparsity.tables import add_tables

RANK = 4


@pytest.fixture(scope="module")
def setup():
    model = random_model(ModelConfig(**TINY), dtype=torch.float32, seed=0)
    toks = torch.randint(0, 97, (2600,), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, toks[:2000], seq_len=128, progress=False, lowrank=RANK)
    add_tables(model, cal, toks[:2000], toks[2000:], progress=False)
    return model, cal, toks


def test_split_is_exact_when_nothing_is_dropped(setup) -> None:
    """Thresholds of 0 drop nothing: the split product equals the plain one, and the
    dense forward (no sparsity, no observer) is the plain product itself."""
    model, cal, toks = setup
    ids = toks[:64][None]
    plain = copy.deepcopy(model)
    lr.set_lowrank(plain, None)
    with torch.no_grad():
        ref = plain(ids)
        assert torch.equal(model(ids), ref)
        model.set_sparsity(torch.zeros(2, 7), mode="all")
        got = model(ids)
        model.clear_sparsity()
    assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())


def test_site_sees_the_remainder_and_the_sum_is_the_reference(setup) -> None:
    """Observed mlp-in inputs are orthogonal to U, and a sparse MLP is the reference
    sparse product of the remainder plus the dense rank-r term."""
    model, cal, toks = setup
    mlp = model.layers[1].mlp
    x = torch.randn(3, 5, TINY["dim"], generator=torch.Generator().manual_seed(1))
    seen = {}

    def observe(layer, site, t, pos_mask):
        seen[site] = t.clone()

    thr = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.4, 0.3, 0.0])
    from teal.kernels.dispatch import SparseCall

    with torch.no_grad():
        got = mlp._split_gate_up(x, SparseCall(thr, None, None, "torch"), observe, None)
    res = seen["mlp_in"]
    assert float((res @ mlp.lr_u).abs().max()) < 1e-5
    ffn = TINY["ffn_dim"]
    gu = reference.sparse_linear_fused(res, mlp.w_gate_up, thr[4:6], (ffn, ffn))
    gu = gu + (x @ mlp.lr_u) @ mlp.lr_uw
    want = reference.apply_act(gu[..., :ffn], "silu") * gu[..., ffn:]
    assert torch.allclose(got, want, atol=1e-5)


def test_calibration_stores_and_binds_the_split(setup, tmp_path) -> None:
    model, cal, _ = setup
    bases = cal.lowrank_bases
    assert bases.shape == (TINY["n_layers"], TINY["dim"], RANK)
    eye = torch.eye(RANK).expand(TINY["n_layers"], RANK, RANK)
    assert torch.allclose(bases.transpose(1, 2) @ bases, eye, atol=1e-5)
    assert cal.metadata["lowrank"]["rank"] == RANK
    share = lr.overhead_share(model.config, RANK)
    assert cal.lowrank_overhead == pytest.approx(share)
    path = cal.save(tmp_path / "cal.safetensors")
    fresh = random_model(ModelConfig(**TINY), dtype=torch.float32, seed=0)
    fresh.fingerprint = model.fingerprint
    assert fresh.lowrank_bases is None
    loaded = Calibration.load(path, fresh)  # binds
    assert lr.same_split(fresh.lowrank_bases, bases)
    assert torch.allclose(fresh.layers[0].mlp.lr_uw, model.layers[0].mlp.lr_uw)
    setting_for(loaded, "greedy-layers", 0.5, fresh)  # in the calibration's split
    lr.set_lowrank(fresh, None)
    with pytest.raises(TealError, match="low-rank"):
        setting_for(loaded, "greedy-layers", 0.5, fresh)


def test_levels_pay_for_the_dense_term(setup) -> None:
    """Every method's levels rise by the split's share, so the bytes skipped are the
    sparsity asked for; the meter subtracts the share; CATS refuses."""
    model, cal, toks = setup
    share = cal.lowrank_overhead
    assert 0 < share < 0.2
    want = cal.stats.thresholds(0.5 + share)
    assert torch.equal(setting_for(cal, "uniform", 0.5, model).thresholds, want)
    lv = torch.full((2, 7), 0.5)
    meter = SparsityMeter(model.config, cal.stats.thresholds(lv), overhead=share)
    meter.zeroed += 50.0
    meter.seen += 100.0
    assert meter.weighted() == pytest.approx(0.5 - share)
    with pytest.raises(TealError, match="CATS"):
        setting_for(cal, "cats", 0.3, model)


def test_greedy_search_sees_the_split(setup) -> None:
    """The search's block model adds the dense rank-r term: at thresholds 0 its error is
    0, and it matches the model's own MLP at a sparse setting."""
    model, cal, toks = setup
    ids = allocate.held_out_windows(toks[2000:2256], 128, None)
    inputs = allocate.capture_inputs(model, ids)
    assert inputs[0].mlp_low is not None
    assert allocate.block_error(model, 0, inputs[0], torch.zeros(7)) < 1e-10
    thr = cal.stats.thresholds(torch.full((2, 7), 0.5))[0]
    e = allocate.block_error(model, 0, inputs[0], thr, dense_first=False)
    assert e > 0
    blk = model.layers[0]
    from teal.kernels.dispatch import SparseCall

    x = blk.ffn_norm(inputs[0].block_in + 0)  # any input: compare the two MLP paths
    with torch.no_grad():
        mine = blk.mlp._split_gate_up(x, SparseCall(thr, None, None, "torch"), None, None)
    b = allocate._Block(model, 0, x.shape[1], False, (x @ blk.mlp.lr_u) @ blk.mlp.lr_uw)
    res = x - (x @ blk.mlp.lr_u) @ blk.mlp.lr_u.T
    theirs = b.mid(b.proj(4, res, float(thr[4])), b.proj(5, res, float(thr[5])))
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_cpu_decode_runs_the_split(setup) -> None:
    """The CPU backend's one-token steps go through MLP.forward (no native fused step)
    and give the reference backend's logits."""
    model, cal, toks = setup
    thr = setting_for(cal, "greedy-layers", 0.5, model, mode="decode").thresholds
    prompt = toks[:12][None]
    outs = {}
    for backend in ("torch", "cpu"):
        m = copy.deepcopy(model)
        m.set_backend(backend)
        m.set_sparsity(thr, mode="decode")
        m.setup_cache(1, 32)
        with torch.no_grad():
            m(prompt, torch.arange(12))
            outs[backend] = m(toks[12:13][None], torch.tensor([12]))
    assert torch.allclose(outs["cpu"], outs["torch"], atol=1e-4)


def test_bad_requests() -> None:
    model = random_model(ModelConfig(**TINY), dtype=torch.float32, seed=0)
    toks = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TealError, match="rank"):
        lr.fit_lowrank(model, toks, 128, TINY["dim"])
    with pytest.raises(TealError, match="fit"):
        lr.set_lowrank(model, torch.zeros(3, TINY["dim"], 2))
    with pytest.raises(TealError, match="teal.load"):
        lr.set_lowrank(torch.nn.Linear(2, 2), torch.zeros(2, TINY["dim"], 2))


def test_engine_step_runs_the_split(setup) -> None:
    """The decode engine's step (eager here; compiled and captured on a GPU) gives the
    eager generation loop's tokens with a low-rank split set."""
    from teal.engine.cuda import CudaEngine
    from teal.generate import generate

    model, cal, toks = setup
    m = copy.deepcopy(model)
    m.set_sparsity(setting_for(cal, "greedy-layers", 0.5, m, mode="decode").thresholds)
    prompt = toks[:6].tolist()
    want = generate(m, prompt, max_new_tokens=16, stop_at_eos=False).token_ids
    engine = CudaEngine(m, len(prompt) + 16, compile="none", graph=False)
    assert engine.generate(torch.tensor([prompt]), 16).tokens.tolist() == want
    assert engine._key()[-1] == id(m.lowrank_bases)
