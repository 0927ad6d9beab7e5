"""``teal lm-eval --model teal``: lm-eval's harness on a sparsified model, offline, on a
tiny Hugging Face folder and a multiple-choice task made here (a YAML task over JSONL).
Skips where lm-eval is not installed (it is in the ``eval`` extra, not ``test``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

import teal  # noqa: E402
import teal.cli  # noqa: E402
from helpers_ckpt import write_gguf_checkpoint, write_hf_checkpoint  # noqa: E402
from teal.model.config import ModelConfig  # noqa: E402
from test_calibration import write_text  # noqa: E402

CFG = ModelConfig(
    vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
    max_seq_len=256, bos_token_id=1, eos_token_ids=(2,),
)  # fmt: skip
QUESTIONS = [
    ("The capital of France is", ["Paris", "Rome", "the river"], 0),
    ("Once upon a time there was a", ["little model", "stone", "song"], 0),
    ("The quick brown fox jumps over the", ["lazy dog", "north", "light"], 0),
    ("Hello, world! How are", ["you today", "the weights", "beta"], 0),
]


def _task(tmp_path):
    data = tmp_path / "choice.jsonl"
    data.write_text(
        "".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "teal_tiny.yaml").write_text(
        "task: teal_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """What lm-eval's HF model computes for one request, on our model: context and
    continuation tokenized as it does, the continuation's summed log-probabilities."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_lm_eval_teal_model_scores_like_our_sparse_model(offline, capsys):
    """The documented command runs the task offline, and every log-likelihood it scored
    is the one our own model gives under the same calibration, method and level."""
    tmp = offline
    folder = write_hf_checkpoint(tmp / "hf", CFG, seed=4)
    text = write_text(tmp / "text.txt", paragraphs=200)
    cal = tmp / "tiny.calib.safetensors"
    argv = ["calibrate", "--model", str(folder), "--text", str(text), "--tokens", "800"]
    assert teal.cli.main([*argv, "--seq-len", "128", "--out", str(cal)]) == 0
    tasks = _task(tmp)
    model_args = f"pretrained={folder},calibration={cal},sparsity=0.5,method=greedy-layers"
    code = teal.cli.main(
        ["lm-eval", "--model", "teal", "--model_args", model_args + ",dtype=float32",
         "--tasks", "teal_tiny", "--include_path", str(tasks), "--device", "cpu",
         "--batch_size", "2", "--output_path", str(tmp / "out"), "--log_samples"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    (results,) = (tmp / "out").rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["teal_tiny"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    (samples,) = (tmp / "out").rglob("samples_teal_tiny_*.jsonl")
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(docs) == len(QUESTIONS)

    ours = teal.load(folder)
    teal.sparsify(ours, cal, 0.5, "greedy-layers", mode="all")
    ours.set_backend("torch")
    checked = 0
    for doc in docs:
        for args, resp in zip(doc["arguments"].values(), doc["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            want = _our_loglikelihood(ours, ours.tokenizer, context, continuation)
            got = float(resp[0][0])
            assert math.isclose(got, want, abs_tol=1e-3), (context, continuation, got, want)
            checked += 1
    assert checked == sum(len(c) for _, c, _ in QUESTIONS)
    # ... and the sparsity mattered: the dense model scores differently.
    ours.clear_sparsity()
    context, continuation = docs[0]["arguments"]["gen_args_0"].values()
    dense = _our_loglikelihood(ours, ours.tokenizer, context, continuation)
    assert abs(dense - float(docs[0]["resps"][0][0][0])) > 1e-3


def test_gguf_source_becomes_a_transformers_model_with_our_fingerprint(tmp_path):
    """GGUF files (and the default model, a GGUF) reach lm-eval through our loader: the
    transformers model has the fingerprint and the logits of ``teal.load``'s."""
    from teal import hf as teal_hf

    path = write_gguf_checkpoint(tmp_path / "m.gguf", CFG, seed=5, qtype="Q8_0")
    hf_model, tok = teal_hf.load_transformers(str(path))
    ours = teal.load(path)
    assert teal_hf.fingerprint(hf_model) == ours.fingerprint
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert (hf_model(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_lm_eval_errors_are_one_line(offline, capsys):
    """Bad input (no calibration, an unknown task) is one line and exit status 2."""
    tasks = str(_task(offline))
    for argv, message in (
        (["--model_args", "sparsity=0.5", "--tasks", "teal_tiny"], "calibration=FILE"),
        (["--model_args", "sparsity=0", "--tasks", "no_such_task"], "Tasks not found"),
    ):
        code = teal.cli.main(["lm-eval", "--model", "teal", "--include_path", tasks, *argv])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err.startswith("teal: error:") and message in err
