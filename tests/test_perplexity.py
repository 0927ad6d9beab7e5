"""Perplexity: the decode-like protocol against real token-by-token decoding on the KV
cache, the full protocol against a plain computation, window planning, context limit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers_models import TINY
from teal.errors import ContextLengthError, TealError
from teal.eval.perplexity import evaluate, perplexity, plan_windows
from teal.model.build import random_model
from teal.model.config import ModelConfig
from teal.sparsity.stats import collect_stats


@pytest.fixture(scope="module")
def setup():
    model = random_model(ModelConfig(**TINY), dtype=torch.float32, seed=0)
    ids = torch.randint(0, 97, (1200,), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, ids, seq_len=128, progress=False)
    return model, ids, stats


def _decode_nll(model, window: torch.Tensor, thresholds: torch.Tensor) -> tuple[float, int]:
    """The decode-like figure the slow way: a dense prefill of the first half into the
    KV cache, then one sparse decode step per token of the second half."""
    n, h = window.numel(), window.numel() // 2
    ids = window[None]
    model.setup_cache(1, n)
    try:
        with torch.inference_mode():
            model.clear_sparsity()
            model(ids[:, :h], torch.arange(h))
            model.set_sparsity(thresholds, mode="decode")
            nll, count = 0.0, 0
            for i in range(h, n - 1):
                logits = model(ids[:, i : i + 1], torch.tensor([i]))
                nll += float(F.cross_entropy(logits[0, -1:].float(), ids[0, i + 1 : i + 2]))
                count += 1
    finally:
        model.clear_cache()
        model.clear_sparsity()
    return nll, count


def test_decode_like_equals_token_by_token_decoding(setup):
    model, ids, stats = setup
    thr = stats.thresholds(0.5)
    window = ids[:96]
    # Logits position by position: the parallel forward with the per-position switch...
    mask = torch.zeros(1, 96, dtype=torch.bool)
    mask[:, 48:] = True
    model.set_sparsity(thr, mode="decode")
    with torch.inference_mode():
        parallel = model(window[None], sparse_mask=mask)
    model.clear_sparsity()
    # ... against the cache, one sparse token at a time after a dense prefill.
    model.setup_cache(1, 96)
    with torch.inference_mode():
        prefill = model(window[None, :48], torch.arange(48))
        model.set_sparsity(thr, mode="decode")
        steps = [model(window[None, i : i + 1], torch.tensor([i])) for i in range(48, 96)]
    model.clear_cache()
    model.clear_sparsity()
    assert torch.allclose(parallel[:, :48], prefill, atol=1e-5)
    assert torch.allclose(parallel[:, 48:], torch.cat(steps, dim=1), atol=1e-5)
    # The sparse steps really are sparse (not a dense run that happens to agree).
    with torch.inference_mode():
        dense = model(window[None])
    assert not torch.allclose(parallel[:, 48:], dense[:, 48:], atol=1e-3)
    # And the protocol's perplexity is the decoded one.
    nll, count = _decode_nll(model, window, thr)
    res = perplexity(
        model,
        window,
        protocol="decode-like",
        thresholds=thr,
        sparsity=0.5,
        window=96,
        progress=False,
    )
    assert res.tokens == count == 47
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert model.sparse_mode == "off" and model.observer is None


def test_full_protocol_matches_a_plain_computation(setup):
    model, ids, stats = setup
    thr = stats.thresholds(0.4)
    model.set_sparsity(thr, mode="all")
    with torch.inference_mode():
        logits = model(ids[:200].view(2, 100))
    model.clear_sparsity()
    targets = ids[:200].view(2, 100)[:, 1:]
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 97), targets.reshape(-1))
    res = perplexity(
        model,
        ids[:200],
        protocol="full",
        thresholds=thr,
        sparsity=0.4,
        window=100,
        progress=False,
        batch_size=2,
    )
    assert res.tokens == 198
    assert res.perplexity == pytest.approx(math.exp(ref.item()), rel=1e-5)
    assert 0.3 < res.measured_sparsity < 0.5


def test_evaluate_shares_the_dense_pass_and_reports_rows(setup):
    model, ids, stats = setup
    thresholds = {0.0: None, 0.5: stats.thresholds(0.5)}
    rows = evaluate(model, ids, thresholds, window=128, progress=False)
    assert [(r.protocol, r.sparsity) for r in rows] == [
        ("decode-like", 0.0),
        ("decode-like", 0.5),
        ("full", 0.0),
        ("full", 0.5),
    ]
    single = perplexity(model, ids, protocol="decode-like", window=128, progress=False)
    assert single.perplexity == pytest.approx(rows[0].perplexity, rel=1e-6)
    assert rows[0].measured_sparsity == 0.0
    for r in rows[1::2]:
        assert abs(r.measured_sparsity - 0.5) < 0.05
        assert set(r.to_json()) == {
            "method",
            "protocol",
            "sparsity",
            "measured_sparsity",
            "perplexity",
            "tokens",
        }
    full_rows = [r for r in rows if r.protocol == "full"]
    assert full_rows[0].tokens == 1200 - math.ceil(1200 / 128)  # every target but window starts


def test_window_planning():
    ids = torch.arange(1000)
    wins = plan_windows(ids, 100)
    assert len(wins) == 10 and all(w.ids.numel() == 100 for w in wins)
    assert sum(int(w.targets.sum()) for w in wins) == 990
    # Overlapping windows score each target once.
    wins = plan_windows(ids, 100, stride=50)
    assert sum(int(w.targets.sum()) for w in wins) == 999
    assert wins[-1].ids[-1].item() == 999
    # With BOS, each window starts with it and every stream token is a target.
    wins = plan_windows(ids, 101, bos=7)
    assert all(w.ids[0].item() == 7 for w in wins)
    assert sum(int(w.targets.sum()) for w in wins) == 1000
    with pytest.raises(TealError):
        plan_windows(ids, 100, stride=0)


def test_context_limit_is_respected(setup):
    model, ids, _ = setup
    with pytest.raises(ContextLengthError, match="context of 256"):
        perplexity(model, ids, window=512, progress=False)
    # The default window (2048) is capped at the model's 256-token context.
    res = perplexity(model, ids, progress=False)
    assert res.tokens == 1200 - math.ceil(1200 / 256)


def test_bad_protocol_and_short_text(setup):
    model, ids, _ = setup
    with pytest.raises(TealError, match="protocol"):
        perplexity(model, ids, protocol="sideways", progress=False)
    with pytest.raises(TealError):
        perplexity(model, ids[:1], progress=False)
