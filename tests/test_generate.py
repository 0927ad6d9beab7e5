"""Generation and ``teal generate``: parity with transformers on real and GGUF checkpoints,
the JSON output, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

import teal
from helpers_ckpt import write_gguf_checkpoint, write_hf_checkpoint
from teal.cli import main as cli_main
from teal.errors import ContextLengthError, TealError
from teal.model.config import ModelConfig

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(
    vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
    max_seq_len=64, bos_token_id=1, eos_token_ids=(2,),
)  # fmt: skip


def _fp32() -> dict:
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def _hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.network
@pytest.mark.slow
def test_default_model_matches_transformers(default_model_path):
    """The issue's bar: fp32 logits within 1e-3 on a 64-token prompt, and the same 32
    greedy tokens, against transformers loading the same GGUF file."""
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, **_fp32()
    ).eval()
    ours = teal.load(None, dtype="fp32")
    text = (
        "The history of the Roman Empire spans many centuries, from the founding of the city"
        " to the fall of Constantinople. Its institutions, languages and roads shaped Europe"
        " for a thousand years, and historians still argue about why it declined. Trade"
        " moved grain from Egypt, oil from Spain and wine from Gaul across the Mediterranean,"
        " while legions guarded frontiers on the Rhine, the Danube and in northern Britain."
    )
    ids = ours.tokenizer(text)["input_ids"][:64]
    assert len(ids) == 64
    with torch.no_grad():
        diff = (ours(torch.tensor([ids])) - ref(torch.tensor([ids])).logits).abs().max()
    assert diff.item() <= 1e-3
    prompt = ours.tokenizer("The capital of France is")["input_ids"]
    got = ours.generate(prompt, max_new_tokens=32, stop_at_eos=False).token_ids
    assert got == _hf_greedy(ref, prompt, 32)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_gguf_checkpoint_greedy_matches_transformers(tmp_path, qtype):
    """A Llama-family GGUF file that is not the default model, given by path."""
    pytest.importorskip("accelerate")
    path = write_gguf_checkpoint(tmp_path / "m.gguf", TINY, seed=3, qtype=qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, **_fp32()
    ).eval()
    ours = teal.load(path)
    prompt = [1, 40, 41, 42, 43, 44]
    assert ours.generate(prompt, max_new_tokens=20, stop_at_eos=False).token_ids == _hf_greedy(
        ref, prompt, 20
    )


def test_hf_folder_loads_and_generates(tmp_path, capsys):
    folder = write_hf_checkpoint(tmp_path / "m", TINY, seed=4)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **_fp32()).eval()
    ours = teal.load(folder)
    prompt = [1, 10, 11, 12]
    assert ours.generate(prompt, max_new_tokens=16, stop_at_eos=False).token_ids == _hf_greedy(
        ref, prompt, 16
    )
    code = cli_main(["generate", "ab ba", "--model", str(folder), "--max-new-tokens", "5",
                     "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    obj = json.loads(out)  # stdout holds exactly one JSON object
    assert {"text", "prompt_tokens", "new_tokens", "tokens_per_second"} <= set(obj)
    assert 1 <= obj["new_tokens"] <= 5 and obj["prompt_tokens"] >= 1


def test_generate_cli_int4_gptq(tmp_path, capsys):
    """``--quant int4 --gptq TEXT``: GPTQ statistics from the text's calibration part;
    ``--gptq`` with weights it cannot round is bad input."""
    folder = write_hf_checkpoint(tmp_path / "m", TINY, seed=5)
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(f"ab ba {i} aab bba {i * 7}" for i in range(60)))
    code = cli_main(["generate", "ab ba", "--model", str(folder), "--max-new-tokens", "3",
                     "--quant", "int4", "--group-size", "16", "--gptq", str(text),
                     "--json"])  # fmt: skip
    obj = json.loads(capsys.readouterr().out)
    assert code == 0 and obj["quant"] == "int4-g16-gptq" and 1 <= obj["new_tokens"] <= 3
    code = cli_main(["generate", "x", "--model", str(folder), "--quant", "gguf",
                     "--gptq", str(text)])  # fmt: skip
    assert code == 2 and "--gptq rounds int8 or int4" in capsys.readouterr().err


def test_generate_cli_int8_on_threads(tmp_path, capsys):
    """``--quant int8 --threads 1``: int8 weights (the native CPU kernel), one thread for
    the run, torch's thread count restored after; a bad thread count is bad input."""
    import torch

    folder = write_hf_checkpoint(tmp_path / "m", TINY, seed=4)
    before = torch.get_num_threads()
    code = cli_main(["generate", "ab ba", "--model", str(folder), "--max-new-tokens", "5",
                     "--quant", "int8", "--threads", "1", "--json"])  # fmt: skip
    obj = json.loads(capsys.readouterr().out)
    assert code == 0 and obj["quant"] == "int8" and 1 <= obj["new_tokens"] <= 5
    assert torch.get_num_threads() == before
    assert cli_main(["generate", "x", "--model", str(folder), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_generate_streams_new_text_only(tmp_path):
    folder = write_hf_checkpoint(tmp_path / "m", TINY, seed=5)
    model = teal.load(folder)
    pieces: list[str] = []
    result = model.generate("ab", max_new_tokens=8, stream=pieces.append, stop_at_eos=False)
    assert "".join(pieces) == result.text
    assert result.new_tokens == 8 and len(result.token_ids) == 8


def test_sampling_is_seeded(tmp_path):
    model = teal.load(write_hf_checkpoint(tmp_path / "m", TINY, seed=6))
    a = model.generate([1, 5], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7,
                       stop_at_eos=False)  # fmt: skip
    b = model.generate([1, 5], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7,
                       stop_at_eos=False)  # fmt: skip
    assert a.token_ids == b.token_ids


def test_prompt_longer_than_context_is_an_error(tmp_path):
    model = teal.load(write_hf_checkpoint(tmp_path / "m", TINY, seed=1))
    with pytest.raises(ContextLengthError, match="context"):
        model.generate(list(range(3, 3 + TINY.max_seq_len)), max_new_tokens=4)


def test_too_many_new_tokens_are_shortened_with_a_warning(tmp_path):
    model = teal.load(write_hf_checkpoint(tmp_path / "m", TINY, seed=1))
    with pytest.warns(UserWarning, match="fit"):
        out = model.generate(list(range(3, 3 + 60)), max_new_tokens=10, stop_at_eos=False)
    assert out.new_tokens == TINY.max_seq_len - 60


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model/path"], "no such file"),
        (["--dtype", "int3"], "dtype"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    folder = write_hf_checkpoint(tmp_path / "m", TINY, seed=2)
    base = ["generate", "hello", "--model", str(folder)]
    code = cli_main(base + args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("teal: error:") and message in err


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(TealError):
        cli_main(["--debug", "generate", "x", "--model", str(tmp_path / "missing")])


def test_folder_without_config_via_cli(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["generate", "x", "--model", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err
