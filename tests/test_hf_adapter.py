"""The Hugging Face adapter applies exactly our model's sparsity rule."""

from __future__ import annotations

import pytest
import torch

from teal import hf as teal_hf
from teal.model.build import fingerprint, from_checkpoint
from teal.model.config import ModelConfig
from teal.sparsity.methods import METHODS

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(
    vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=80,
    max_seq_len=64,
)  # fmt: skip


def _pair(cfg=CFG):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg.to_hf()), attn_implementation="eager"
    ).eval()
    ours = from_checkpoint(cfg, hf.state_dict().__getitem__, dtype=torch.float32)
    ours.fingerprint = fingerprint(cfg, hf.state_dict().__getitem__)
    return hf, ours


@pytest.mark.parametrize("level", [0.0, 0.3, 0.6])
def test_adapter_matches_our_sparse_model(level):
    hf, ours = _pair()
    gen = torch.Generator().manual_seed(1)
    thresholds = torch.rand(CFG.n_layers, 7, generator=gen) * level
    ids = torch.randint(0, CFG.vocab_size, (2, 20), generator=gen)
    handle = teal_hf.sparsify(hf, thresholds, mode="all")
    ours.set_sparsity(thresholds, mode="all")
    with torch.no_grad():
        got, want = hf(ids).logits, ours(ids)
    assert (got - want).abs().max() <= 1e-4
    handle.remove()
    ours.clear_sparsity()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_decode_mode_leaves_prefill_dense():
    hf, _ = _pair()
    ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = hf(ids).logits
        handle = teal_hf.sparsify(hf, torch.full((CFG.n_layers, 7), 0.5), mode="decode")
        assert torch.equal(hf(ids).logits, dense)
        assert not torch.allclose(hf(ids[:, :1]).logits, dense[:, :1])
        handle.remove()


def test_fingerprint_is_shared_with_our_loader():
    hf, ours = _pair()
    assert teal_hf.fingerprint(hf) == ours.fingerprint


def test_threshold_shape_is_checked():
    hf, _ = _pair()
    with pytest.raises(ValueError, match="shape"):
        teal_hf.sparsify(hf, torch.zeros(5, 7))


# ----- the one-call API: teal.sparsify / teal.calibrate --------------------------------

WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "song")


def _texts(n: int = 40, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A transformers model, our model with the same weights, and one calibration made
    from the transformers model through ``teal.calibrate`` (every method's tables)."""
    import teal
    from test_calibration import CharTokenizer

    hf, ours = _pair()
    ours.tokenizer = CharTokenizer(CFG.vocab_size)
    cal = teal.calibrate(
        hf, _texts(), tokenizer=ours.tokenizer, tokens=1500, seq_len=64, methods=METHODS,
        progress=False,
    )  # fmt: skip
    path = cal.save(tmp_path_factory.mktemp("cal") / "tiny.calib.safetensors")
    return hf, ours, cal, path


@pytest.mark.parametrize("method", METHODS)
def test_sparsify_gives_our_logits_on_a_transformers_model(calibrated, method):
    """Same calibration, same call: the transformers model and ours give the same logits,
    sparse and (after remove) dense; and the sparsity does change them."""
    import teal

    hf, ours, cal, path = calibrated
    ids = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dense = hf(ids).logits
    got = teal.sparsify(hf, path, 0.4, method, mode="all")  # a file ...
    want = teal.sparsify(ours, cal, 0.4, method, mode="all")  # ... or the loaded object
    try:
        assert torch.equal(got.thresholds, want.thresholds)
        assert got.method == method and got.sparsity == 0.4
        with torch.no_grad():
            sparse_hf, sparse_ours = hf(ids).logits, ours(ids)
        assert (sparse_hf - sparse_ours).abs().max() <= 1e-4
        assert (sparse_hf - dense).abs().max() > 1e-2  # the rule did act
    finally:
        got.remove()
        want.remove()
    with torch.no_grad():
        # Dense again; the value heads stay in the calibration's basis (teal.model.rotate),
        # the same function up to rounding.
        assert (hf(ids).logits - dense).abs().max() <= 1e-4
        assert (ours(ids) - dense).abs().max() <= 1e-4


def test_sparsify_decode_mode_and_a_second_call_replaces_the_first(calibrated):
    import teal

    hf, ours, cal, _ = calibrated
    ids = torch.randint(0, CFG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(6))
    step = ids[:, :1]
    with torch.no_grad():
        dense, dense_step = hf(ids).logits, hf(step).logits
        teal.sparsify(hf, cal, 0.3, "uniform")  # replaced by the next call, not stacked
        s = teal.sparsify(hf, cal, 0.5, "greedy-layers")
        mine = teal.sparsify(ours, cal, 0.5, "greedy-layers")
        assert s.mode == "decode"
        assert torch.equal(hf(ids).logits, dense)  # prefill stays dense
        one = hf(step).logits
        assert not torch.allclose(one, dense_step)
        assert (one - ours(step)).abs().max() <= 1e-4
        s.remove()
        mine.remove()
        assert torch.equal(hf(step).logits, dense_step)


def test_sparsify_rejects_another_models_calibration_and_unreachable_levels(calibrated):
    import teal
    from teal.errors import CalibrationMismatchError, TealError

    hf, _, cal, path = calibrated
    torch.manual_seed(7)
    other = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**CFG.to_hf())
    ).eval()
    with pytest.raises(CalibrationMismatchError, match="fingerprint.*recalibrate"):
        teal.sparsify(other, path, 0.5)
    with pytest.raises(TealError, match="at most"):
        teal.sparsify(hf, cal, 0.6, "cats")  # CATS stops at the up+down share (~43 %)
    with pytest.raises(TealError, match="unknown sparsity method"):
        teal.sparsify(hf, cal, 0.5, "magic")
    assert not hasattr(hf, "_teal_sparsity")


def test_calibrate_on_transformers_equals_calibrate_on_ours(calibrated):
    """``teal.calibrate`` on the transformers model and on ours (same weights, same
    text) writes the same statistics and tables."""
    import teal

    _, _, cal, _ = calibrated
    ours = _pair()[1]  # as the fixture's was: still in the checkpoint's value basis
    ours.tokenizer = calibrated[1].tokenizer
    mine = teal.calibrate(ours, _texts(), tokens=1500, seq_len=64, methods=METHODS, progress=False)
    assert mine.fingerprint == cal.fingerprint == teal_hf.fingerprint(calibrated[0])
    assert torch.equal(mine.stats.counts, cal.stats.counts)
    assert set(mine.tables) == set(cal.tables) and mine.tables
    for name, t in cal.tables.items():
        assert torch.equal(mine.tables[name], t), name
    assert mine.metadata["text"] == cal.metadata["text"]


def test_calibrate_api_writes_what_the_cli_writes(tmp_path, monkeypatch, capsys):
    """`teal calibrate --model FOLDER --text FILE` and teal.calibrate on the same folder
    loaded with transformers give the same artifact (statistics, tables, model, text)."""
    import teal
    import teal.cli
    from helpers_ckpt import write_hf_checkpoint
    from teal.sparsity.artifact import Calibration
    from test_calibration import write_text

    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))
    cfg = ModelConfig(
        vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
        max_seq_len=128, bos_token_id=1, eos_token_ids=(2,),
    )  # fmt: skip
    folder = write_hf_checkpoint(tmp_path / "hf", cfg, seed=3)
    text = write_text(tmp_path / "text.txt", paragraphs=200)
    out = tmp_path / "cli.calib.safetensors"
    argv = ["calibrate", "--model", str(folder), "--text", str(text), "--tokens", "800"]
    assert teal.cli.main([*argv, "--seq-len", "128", "--out", str(out), "--json"]) == 0
    assert '"methods": ["auto"]' in capsys.readouterr().out  # the default method
    from_cli = Calibration.load(out)

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    api = teal.calibrate(hf, text, tokens=800, seq_len=128, progress=False)
    assert api.fingerprint == from_cli.fingerprint
    assert torch.equal(api.stats.counts, from_cli.stats.counts)
    assert set(api.tables) == set(from_cli.tables) == {
        "greedy.levels", "greedy.error", "greedy.block_sparsity", "greedy.sensitivity",
        "seq.delta", "seq.grid",  # greedy-layers-seq, one of auto's candidates
        "select.nll", "select.grid",  # the default method, auto, reads all three kinds
        "rotation.values",  # the value heads' basis (teal.model.rotate)
    }  # fmt: skip
    for name, t in from_cli.tables.items():
        assert torch.equal(api.tables[name], t), name
    for key in ("text", "tokens", "seq_len", "bos", "n_layers", "dtype", "method", "version"):
        assert api.metadata[key] == from_cli.metadata[key], key
