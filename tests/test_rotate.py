"""The value-head rotation (``teal.model.rotate``): orthogonal, exact on the dense model,
tied to its calibration, and carried to a fresh load, a transformers model and GGUF."""

from __future__ import annotations

import pytest
import torch

from teal.errors import TealError
from teal.model import rotate
from teal.model.build import random_model
from teal.model.config import ModelConfig
from teal.sparsity.artifact import Calibration
from teal.sparsity.calibrate import calibrate
from teal.sparsity.methods import setting_for

CFG = ModelConfig(
    vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=80,
    max_seq_len=64,
)  # fmt: skip


def _model(**overrides):
    cfg = ModelConfig(**{**CFG.__dict__, **overrides})
    return random_model(cfg, dtype=torch.float32, seed=1)


def _ids(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def _attn_out(model, ids) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}

    def observe(layer, site, x, pos_mask):
        if site == "attn_out":
            seen[layer] = x.reshape(-1, x.shape[-1]).clone()

    model.observer = observe
    with torch.no_grad():
        model(ids[None])
    model.observer = None
    return seen


@pytest.mark.parametrize("bias", [False, True])
def test_rotation_is_orthogonal_exact_and_diagonalises_the_head_outputs(bias):
    model = _model(qkv_bias=bias)
    if bias:  # random_model leaves no zero tensor, but make the bias matter
        with torch.no_grad():
            for blk in model.layers:
                blk.attention.bqkv.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    ids = _ids(40, seed=3)[None]
    with torch.no_grad():
        dense = model(ids)
    bases = rotate.fit_and_rotate(model, _ids(), seq_len=64)
    eye = torch.eye(CFG.head_dim)
    assert bases.shape == (CFG.n_layers, CFG.n_kv_heads, CFG.head_dim, CFG.head_dim)
    assert (bases.transpose(-1, -2) @ bases - eye).abs().max() < 1e-5
    assert not torch.allclose(bases, eye.expand_as(bases))
    with torch.no_grad():
        assert (model(ids) - dense).abs().max() < 1e-4
    # In the new basis each KV head's pooled second moment is diagonal, largest first.
    moments = rotate.value_moments(model, _ids(), seq_len=64)
    diag = torch.diagonal(moments, dim1=-2, dim2=-1)
    off = moments - torch.diag_embed(diag)
    assert off.abs().max() < 1e-6 * diag.max()
    assert (diag[..., :-1] >= diag[..., 1:] * (1 - 1e-6)).all()


def test_going_back_to_the_checkpoint_basis_restores_the_weights():
    model = _model()
    wqkv, wo = model.layers[1].attention.wqkv.clone(), model.layers[1].attention.wo.clone()
    rotate.fit_and_rotate(model, _ids(), seq_len=64)
    assert not torch.allclose(model.layers[1].attention.wo, wo)
    rotate.set_value_bases(model, None)
    assert model.value_bases is None
    torch.testing.assert_close(model.layers[1].attention.wqkv, wqkv, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.layers[1].attention.wo, wo, rtol=0, atol=1e-6)


def test_calibration_records_the_basis_and_binds_a_fresh_model(tmp_path):
    model = _model()
    cal = calibrate(model, _ids(1024), seq_len=64, progress=False)
    assert model.value_bases is not None and torch.equal(cal.value_bases, model.value_bases)
    assert cal.metadata["value_rotation"]["basis"] == "principal-axes"
    path = cal.save(tmp_path / "cal.safetensors")
    fresh = _model()
    assert fresh.value_bases is None
    with pytest.raises(TealError, match="value basis"):
        setting_for(cal, "uniform", 0.5, fresh)  # unbound: its attn-out is another basis
    loaded = Calibration.load(path, fresh)  # binds
    assert torch.equal(fresh.value_bases, model.value_bases)
    ids = _ids(30, seed=4)
    want, got = _attn_out(model, ids), _attn_out(fresh, ids)
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=1e-6)
    setting_for(loaded, "uniform", 0.5, fresh)  # bound: accepted
    # A calibration without rotation puts the model back in the checkpoint's basis.
    plain = calibrate(_model(), _ids(1024), seq_len=64, progress=False, rotate=False)
    assert plain.value_bases is None and "value_rotation" not in plain.metadata
    plain.bind(fresh)
    assert fresh.value_bases is None


def test_a_transformers_model_is_rotated_like_ours():
    pytest.importorskip("transformers")
    import teal
    from test_calibration import CharTokenizer
    from test_hf_adapter import _pair, _texts

    hf, ours = _pair(CFG)
    ours.tokenizer = CharTokenizer(CFG.vocab_size)
    ids = _ids(24, seed=5)[None]
    with torch.no_grad():
        dense = hf(ids).logits
    cal = teal.calibrate(
        hf, _texts(), tokenizer=ours.tokenizer, tokens=1500, seq_len=64, methods=("uniform",),
        progress=False, rotate=True,
    )  # fmt: skip
    assert cal.value_bases is not None
    got = teal.sparsify(hf, cal, 0.4, "uniform", mode="all")
    want = teal.sparsify(ours, cal, 0.4, "uniform", mode="all")
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
    got.remove()
    want.remove()
    with torch.no_grad():
        assert (hf(ids).logits - dense).abs().max() <= 1e-4  # rotated, same function
    # A second calibration of the (now rotated) transformers model starts from its basis.
    again = teal.calibrate(
        hf, _texts(), tokenizer=ours.tokenizer, tokens=1500, seq_len=64, methods=("uniform",),
        progress=False, rotate=True,
    )  # fmt: skip
    torch.testing.assert_close(
        again.value_bases.abs(), cal.value_bases.abs(), rtol=0, atol=1e-3
    )  # the same axes (up to sign), now relative to the checkpoint


def test_gguf_rounds_the_rotated_value_weights_itself(tmp_path):
    from teal.model.quant import QuantWeight
    from test_quant import CFG as QCFG
    from test_quant import _gguf_model

    model = _gguf_model(tmp_path, "Q4_1")
    ids = torch.randint(0, QCFG.vocab_size, (12,), generator=torch.Generator().manual_seed(6))
    fit = torch.randint(0, QCFG.vocab_size, (256,), generator=torch.Generator().manual_seed(7))
    rotate.fit_and_rotate(model, fit, seq_len=64)
    ids = ids[None]
    model.set_backend("torch")
    with torch.no_grad():
        dense = model(ids)
    wqkv, w_down = model.layers[1].attention.wqkv.clone(), model.layers[1].mlp.w_down.clone()
    model.quantize("gguf")
    att = model.layers[1].attention
    assert isinstance(att.wqkv, QuantWeight) and att.wqkv.group_size == 32
    assert torch.equal(model.layers[1].mlp.w_down.dequantize(torch.float32), w_down)  # file's
    err = (att.wqkv.dequantize(torch.float32) - wqkv).abs().max()
    assert 0 < err < wqkv.abs().max() / 15  # rounded again: within half a group step
    with torch.no_grad():
        assert (model(ids) - dense).abs().max() < 0.5
    with pytest.raises(TealError, match="float weights"):
        rotate.set_value_bases(model, None)
