"""ReLU-family MLPs (relu, relu^2, dReLU): the model computes them as written, the
natural zeros of the MLP middle are counted by calibration and measurement, and a
threshold of 0 there (what calibration gives at any level below the zero share) drops
exactly those zeros, so the output is unchanged on every backend."""

from __future__ import annotations

import pytest
import torch

from helpers_models import TINY
from teal.eval.perplexity import SparsityMeter
from teal.model.build import random_model
from teal.model.config import ModelConfig
from teal.model.decoder import SITE_PROJECTIONS, SITES
from teal.sparsity import stats as stats_mod

MID = SITES.index("mlp_mid")


def _model(act: str):
    return random_model(ModelConfig(**{**TINY, "act": act}), dtype=torch.float32, seed=4)


def _ids():
    return torch.randint(0, TINY["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("act", ["relu", "relu2", "drelu"])
def test_mlp_is_the_written_formula(act):
    model = _model(act)
    mlp = model.layers[0].mlp
    x = torch.randn(3, TINY["dim"], generator=torch.Generator().manual_seed(1))
    ffn = TINY["ffn_dim"]
    gate, up = x @ mlp.w_gate_up[:, :ffn], x @ mlp.w_gate_up[:, ffn:]
    mid = {
        "relu": torch.relu(gate) * up,
        "relu2": torch.relu(gate) ** 2 * up,
        "drelu": torch.relu(gate) * torch.relu(up),
    }[act]
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x, None, None), mid @ mlp.w_down, rtol=1e-5, atol=1e-6)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(Exception, match="drelu"):
        ModelConfig(**{**TINY, "act": "swiglu2"})


@pytest.mark.parametrize("act,zero_share", [("relu", 0.5), ("drelu", 0.75)])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_natural_zeros_are_counted_and_dropped_for_free(act, zero_share, backend):
    model = _model(act)
    ids = _ids()
    stats = stats_mod.collect_stats(model, ids, progress=False)
    with torch.inference_mode():
        dense = model(ids)
    # Random weights: the gate (and, with dReLU, the up branch) is negative about half
    # the time, so the middle is exactly zero at about 1/2 (relu) or 3/4 (dReLU).
    t = stats.thresholds(0.4)
    for layer in range(TINY["n_layers"]):
        assert stats.quantile(layer, "mlp_mid", 0.4) < 1e-30  # the point mass at 0
    only_mid = torch.full_like(t, float("-inf"))  # every other site dense
    only_mid[:, SITE_PROJECTIONS["mlp_mid"][0]] = 0.0  # down's input: keep every nonzero
    meter = SparsityMeter(model.config, only_mid)
    model.set_backend(backend)
    model.set_sparsity(only_mid, mode="all")
    model.observer = meter
    try:
        with torch.inference_mode():
            sparse = model(ids)
    finally:
        model.observer = None
        model.clear_sparsity()
        model.set_backend("torch")
    share = meter.per_site()[:, MID]
    assert ((share - zero_share).abs() < 0.08).all(), share
    # Dropping exact zeros changes nothing (up to the backend's summation order).
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
