"""Calibration: measured sparsity against requested, the artifact (round trip, foreign,
corrupt, interrupted), the cache, and the calibration/evaluation text split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers_models import TINY
from teal.errors import CalibrationMismatchError, TealError
from teal.eval.corpus import CALIBRATION_EVERY, Corpus, load_corpus
from teal.eval.perplexity import SparsityMeter
from teal.model.build import random_model
from teal.model.config import ModelConfig
from teal.model.decoder import PROJECTIONS, SITE_PROJECTIONS, SITES
from teal.sparsity import stats as stats_mod
from teal.sparsity.artifact import Calibration
from teal.sparsity.calibrate import cached_or_new, calibrate, calibrate_text, default_path


class CharTokenizer:
    """Characters as tokens (mod the tiny vocabulary): enough of a tokenizer for the
    text paths, with no files and no network."""

    bos_token_id = None
    eos_token_id = None
    chat_template = None

    def __init__(self, vocab: int = 97) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % self.vocab for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i % 90) for i in ids)


def tiny_model(seed: int = 0, **overrides):
    model = random_model(ModelConfig(**{**TINY, **overrides}), dtype=torch.float32, seed=seed)
    model.tokenizer = CharTokenizer(model.config.vocab_size)
    return model


def write_text(path: Path, paragraphs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "song"]
    paras = [
        " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(paragraphs)
    ]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----- measured against requested ---------------------------------------------------
LEVELS = (0.1, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)


def _measure(model, ids, thresholds):
    meter = SparsityMeter(model.config, thresholds)
    model.set_sparsity(thresholds, mode="all")
    model.observer = meter
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        model.observer = None
        model.clear_sparsity()
    return meter


@pytest.mark.parametrize("seed", [0, 1])
def test_measured_sparsity_within_one_point_at_every_site_and_level(seed):
    """On the calibration text, each site of each layer, sparsified through the model's
    own sparse path while it sees the activations it was calibrated on (every other
    site dense), zeroes the requested share of its inputs to within one point."""
    model = tiny_model(seed)
    ids = torch.randint(0, 97, (4, 200), generator=torch.Generator().manual_seed(seed))
    stats = stats_mod.collect_stats(model, ids, progress=False)
    for p in LEVELS:
        full = stats.thresholds(p)
        for layer in range(model.config.n_layers):
            for site in SITES:
                only = torch.zeros_like(full)  # threshold 0 keeps every nonzero input
                cols = list(SITE_PROJECTIONS[site])
                only[layer, cols] = full[layer, cols]
                frac = _measure(model, ids, only).per_projection()[layer, cols]
                assert (frac - p).abs().max().item() <= 0.01, (p, layer, site, frac)


@pytest.mark.parametrize("seed", [0, 1])
def test_measured_sparsity_with_every_site_sparse(seed):
    """With every site sparse at once, later sites see inputs shifted by the earlier
    ones, so their measured share drifts from the dense quantile: pinned to one point at
    low levels and, weight-weighted, a few points at high ones (this is why evaluation
    reports the measured figure next to the requested one)."""
    model = tiny_model(seed)
    ids = torch.randint(0, 97, (8, 256), generator=torch.Generator().manual_seed(seed))
    stats = stats_mod.collect_stats(model, ids, progress=False)
    for p in LEVELS:
        meter = _measure(model, ids, stats.thresholds(p))
        frac = meter.per_projection()
        assert frac.shape == (2, len(PROJECTIONS))
        assert meter.per_site().shape == (2, len(SITES))
        # The first site of the first layer sees exactly the calibrated activations.
        assert abs(frac[0, 0].item() - p) <= 0.002
        if p <= 0.25:
            assert (frac - p).abs().max().item() <= 0.01, (p, frac)
        assert abs(meter.weighted() - p) <= 0.05, (p, meter.weighted())


# ----- the artifact -----------------------------------------------------------------
def _calibration(model, tokens: int = 1024) -> Calibration:
    ids = torch.randint(0, 97, (tokens,), generator=torch.Generator().manual_seed(3))
    cal = calibrate(
        model, ids, text={"name": "test", "sha256": "0" * 64}, seq_len=128, progress=False
    )
    cal.tables["greedy.levels"] = torch.rand(4, 2, 7)  # later issues add tables
    return cal


def test_artifact_round_trip_is_exact(tmp_path):
    model = tiny_model()
    cal = _calibration(model)
    path = cal.save(tmp_path / "sub" / "cal.safetensors")
    back = Calibration.load(path, model)
    assert torch.equal(back.stats.counts, cal.stats.counts)
    assert back.stats.bin_lo == cal.stats.bin_lo
    for key, value in cal.metadata.items():
        assert back.metadata[key] == value
    assert back.metadata["model_fingerprint"] == model.fingerprint
    assert back.tokens == 1024 and back.metadata["text"]["name"] == "test"
    assert torch.equal(back.tables["greedy.levels"], cal.tables["greedy.levels"])
    for p in (0.0, 0.3, 0.5, 0.95):
        assert torch.equal(back.thresholds(p), cal.thresholds(p))
    assert [p.name for p in path.parent.iterdir()] == ["cal.safetensors"]  # no temp left


def test_foreign_artifact_is_a_clear_error(tmp_path):
    ours, other = tiny_model(0), tiny_model(1)
    path = _calibration(other).save(tmp_path / "other.safetensors")
    with pytest.raises(CalibrationMismatchError) as err:
        Calibration.load(path, ours)
    msg = str(err.value)
    assert other.fingerprint in msg and ours.fingerprint in msg and "recalibrate" in msg
    # A model with another shape is caught too, even without fingerprints.
    deeper = tiny_model(0, n_layers=3)
    deeper.fingerprint = None
    with pytest.raises(CalibrationMismatchError, match="layers"):
        Calibration.load(path, deeper)


def test_corrupt_artifacts_are_clear_errors(tmp_path):
    model = tiny_model()
    good = _calibration(model).save(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    cases = {
        "garbage": b"this is not a safetensors file at all" * 10,
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "flipped": raw[:-40] + bytes([raw[-40] ^ 0xFF]) + raw[-39:],
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(CalibrationMismatchError, match="not a readable teal calibration"):
            Calibration.load(bad, model)
    from safetensors.torch import save_file

    foreign_format = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign_format))
    with pytest.raises(CalibrationMismatchError):
        Calibration.load(foreign_format)
    with pytest.raises(TealError, match="does not exist"):
        Calibration.load(tmp_path / "missing.safetensors")


def test_interrupted_calibration_leaves_no_file(cache, tmp_path, monkeypatch):
    model = tiny_model()
    part = load_corpus(write_text(tmp_path / "t.txt")).part("calibration")
    calls = {"n": 0}
    real = stats_mod.histogram

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(stats_mod, "histogram", flaky)
    with pytest.raises(KeyboardInterrupt):
        cached_or_new(model, part, tokens=600, progress=False, log=lambda m: None)
    target = default_path(model, part)
    assert not target.exists()
    assert not target.parent.exists() or not any(target.parent.iterdir())
    assert model.observer is None  # the model is left as it was


def test_interrupted_save_keeps_the_old_file_whole(tmp_path, monkeypatch):
    model = tiny_model()
    path = _calibration(model).save(tmp_path / "cal.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def dies_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        _calibration(model, tokens=512).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]


def test_sparsity_outside_unit_interval_is_an_error():
    cal = _calibration(tiny_model())
    from teal.sparsity.methods import thresholds_for

    for bad in (-0.01, 1.0, 2.0):
        with pytest.raises(TealError, match=r"\[0, 1\)"):
            thresholds_for(cal, "uniform", bad)
    with pytest.raises(TealError, match="unknown sparsity method"):
        thresholds_for(cal, "magic", 0.5)


# ----- the cache ---------------------------------------------------------------------
def test_cache_is_made_once_and_keyed_by_model_and_text(cache, tmp_path):
    model = tiny_model()
    part = load_corpus(write_text(tmp_path / "t.txt")).part("calibration")
    said: list[str] = []
    cal, path = cached_or_new(model, part, tokens=500, progress=False, log=said.append)
    assert path.is_file() and str(path).startswith(str(cache))
    assert "calibrating" in said[-1] and cal.tokens == 500
    again, path2 = cached_or_new(model, part, tokens=500, progress=False, log=said.append)
    assert path2 == path and "using cached" in said[-1]
    assert torch.equal(again.stats.counts, cal.stats.counts)
    assert default_path(tiny_model(1), part) != path
    other_text = load_corpus(write_text(tmp_path / "u.txt", seed=1)).part("calibration")
    assert default_path(model, other_text) != path
    # An unreadable cache entry is replaced, not fatal.
    path.write_bytes(b"junk")
    cached_or_new(model, part, tokens=300, progress=False, log=said.append)
    assert "unusable" in said[-2] and Calibration.load(path, model).tokens == 300


def test_calibrate_text_reads_only_the_calibration_part(tmp_path):
    model = tiny_model()
    parts = load_corpus(write_text(tmp_path / "t.txt")).split()
    cal = calibrate_text(model, parts["calibration"], tokens=10**6, seq_len=128, progress=False)
    expected = parts["calibration"].tokens(model.tokenizer)
    assert cal.tokens == expected.numel()
    assert cal.metadata["text"]["part"] == "calibration"
    assert cal.stats.totals()[0, 0].item() == expected.numel() * 48


# ----- text ------------------------------------------------------------------------
def _fake_wiki(n: int = 1000) -> Corpus:
    titles = [f"Article {i}" for i in range(n)]
    docs = [f"Body of article {i}." for i in range(n)]
    return Corpus("wiki", "test", "0" * 64, tuple(docs), tuple(titles))


def test_split_is_deterministic_disjoint_and_complete():
    corpus = _fake_wiki()
    a, b = corpus.split(), _fake_wiki().split()
    assert a == b
    cal, ev = set(a["calibration"].documents), set(a["evaluation"].documents)
    assert not cal & ev and cal | ev == set(corpus.documents)
    assert len(cal) == len(corpus.documents) // CALIBRATION_EVERY
    # A document's side depends on its key: reordering the input changes nothing.
    rev = Corpus("wiki", "test", "0" * 64, corpus.documents[::-1], corpus.keys[::-1])
    assert set(rev.split()["calibration"].documents) == cal


def test_user_files_plain_jsonl_and_errors(tmp_path):
    plain = load_corpus(write_text(tmp_path / "p.txt", paragraphs=50))
    assert len(plain.documents) == 50 and plain.name == "p.txt"
    rows = [json.dumps({"text": f"record {i} " * 20, "id": i}) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n\n", encoding="utf-8")
    jl = load_corpus(tmp_path / "d.jsonl")
    assert len(jl.documents) == 30 and jl.documents[0].startswith("record 0")
    # A few long paragraphs are cut into pieces so both parts get text.
    (tmp_path / "one.txt").write_text("word " * 2000, encoding="utf-8")
    parts = load_corpus(tmp_path / "one.txt").split()
    assert parts["calibration"].documents and parts["evaluation"].documents
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(TealError, match="line 2"):
        load_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(TealError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "tiny.txt").write_text("too short", encoding="utf-8")
    with pytest.raises(TealError, match="too short"):
        load_corpus(tmp_path / "tiny.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(TealError, match="UTF-8"):
        load_corpus(tmp_path / "latin1.txt")
