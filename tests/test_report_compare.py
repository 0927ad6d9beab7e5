"""``teal report RUN...``: one page comparing run folders and result files."""

from __future__ import annotations

import json

import teal.cli
from teal.report import write_report


def _ppl_rows(method: str, base: float, slope: float) -> list[dict]:
    rows = []
    for proto in ("decode-like", "full"):
        for p in (0.0, 0.25, 0.5):
            rows.append(
                {"method": method, "protocol": proto, "sparsity": p,
                 "measured_sparsity": p * 1.02, "perplexity": base * (1 + slope * p * p),
                 "tokens": 4092}
            )  # fmt: skip
    return rows


def _run_folder(path, method: str, slope: float):
    results = {"model": "tiny", "text": "wiki (evaluation part)",
               "results": _ppl_rows(method, 14.0, slope)}  # fmt: skip
    run = {"date": "2026-11-23T10:00:00+00:00", "model": "tiny", "fingerprint": "abc",
           "dtype": "float32", "machine": "2 CPU cores", "method": method,
           "calibration_text": "wiki (calibration part)", "calibration_tokens": 16384,
           "timings": {"load": 1.0}, "seconds_total": 10.0, "samples": []}  # fmt: skip
    write_report(path, results, run)
    return path


def _bench(path):
    rows = [
        {"sparsity": 0.0, "tokens_per_second": 40.0, "path": "dense-matmul",
         "speedup_vs_dense": 0.8, "measured_sparsity": 0.0},
        {"sparsity": 0.0, "tokens_per_second": 50.0, "path": "cpu-kernel",
         "speedup_vs_dense": 1.0, "measured_sparsity": 0.0},
        {"sparsity": 0.5, "tokens_per_second": 60.0, "path": "cpu-kernel",
         "speedup_vs_dense": 1.2, "measured_sparsity": 0.55},
    ]  # fmt: skip
    obj = {"device": "AMD EPYC, 2 logical CPUs", "model": "tiny", "dtype": "bf16",
           "method": "uniform", "engine": "cpu-eager", "date": "2026-11-23",
           "results": rows}  # fmt: skip
    path.write_text(json.dumps(obj))
    return path


def test_report_compares_runs_in_one_page(tmp_path, capsys):
    a = _run_folder(tmp_path / "run-uniform", "uniform", 2.0)
    b = _run_folder(tmp_path / "run-greedy", "greedy-layers", 1.0)
    bench = _bench(tmp_path / "bench-cpu.json")
    out = tmp_path / "report"
    code = teal.cli.main(["report", str(a), str(b), str(bench), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)  # exactly one object
    assert [r["label"] for r in summary["runs"]] == ["run-uniform", "run-greedy", "bench-cpu"]
    assert [r["perplexity_rows"] for r in summary["runs"]] == [6, 6, 0]
    assert summary["runs"][2]["speed_rows"] == 3

    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    for text in ("run-uniform", "run-greedy", "bench-cpu", "greedy-layers", "Decode speed"):
        assert text in page
    # Perplexity at 50 %: uniform 14 * 1.5 = 21.00 (+50.0%), greedy-layers 14 * 1.25 = 17.50
    assert "21.00 (+50.0%) [51.0%]" in page and "17.50 (+25.0%)" in page
    # Speed: the faster dense path (50 tok/s) is the reference; 60 tok/s is 1.20x.
    assert "50.0 tok/s" in page and "60.0 tok/s (1.20x)" in page and "40.0 tok/s" not in page
    assert page.count("data:image/png;base64,") == 2  # quality and speed, embedded
    for png in ("quality.png", "speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "![Perplexity](quality.png)" in md and "| run-greedy | greedy-layers | full |" in md
    data = json.loads((out / "comparison.json").read_text())
    assert len(data["runs"]) == 3 and data["runs"][0]["info"]["machine"] == "2 CPU cores"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_report_takes_eval_json_with_tasks_and_rejects_bad_input(tmp_path, capsys):
    obj = {"model": "tiny", "text": "t.jsonl", "results": [
        {"method": m, "task": "t", "sparsity": p, "measured_sparsity": p, "accuracy": acc,
         "accuracy_norm": acc, "examples": 10}
        for m, p, acc in (("uniform", 0.0, 0.7), ("uniform", 0.5, 0.6))]}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(obj))
    out = tmp_path / "r"
    assert teal.cli.main(["report", str(tmp_path / "eval.json"), "--out", str(out)]) == 0
    assert "0.600 / 0.600" in (out / "report.html").read_text()
    assert (out / "tasks.png").is_file()
    capsys.readouterr()

    (tmp_path / "empty").mkdir()
    for bad, message in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "holds no teal results"),
    ):
        assert teal.cli.main(["report", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("teal: error:") and message in err and "\n" not in err
