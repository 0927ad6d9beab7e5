"""The report folder of ``teal run``: ``results.json`` (the ``teal eval --json`` object),
``run.json`` (settings, timings, samples), ``report.md``, ``report.html`` and
``perplexity.png`` (perplexity against requested sparsity, one line per protocol)."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_figure(fig: Any, path: Path) -> None:
    """``fig`` as a PNG at ``path``, atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def log_scale_if_wide(ax: Any, values: list[float]) -> bool:
    """A log y axis when the values span more than 3x (perplexity explodes at high
    sparsity; a log axis keeps the low end readable), labelled with plain numbers at
    1, 2, 5 x 10^k rather than matplotlib's 2 x 10^1.  Returns whether it did."""
    if not values or min(values) <= 0 or max(values) <= 3 * min(values):
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    return True


def _rows(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    # One line (and table column group) per protocol, or per method and protocol when
    # several methods are compared.
    several = len({r.get("method") for r in results["results"]}) > 1
    for r in results["results"]:
        key = f"{r['method']} {r['protocol']}" if several else r["protocol"]
        by.setdefault(key, []).append(r)
    for rows in by.values():
        rows.sort(key=lambda r: r["sparsity"])
    return by


def plot_perplexity(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    points: dict[float, list[tuple[float, str]]] = {}
    for proto, rows in _rows(results).items():
        xs = [100 * r["sparsity"] for r in rows]
        ys = [r["perplexity"] for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=proto)
        for x, y in zip(xs, ys):
            points.setdefault(x, []).append((y, line.get_color()))
    for x, pts in points.items():
        # At each level the highest value is labelled above its point, the others below,
        # so labels of close lines do not overprint.
        top = max(y for y, _ in pts)
        for y, color in pts:
            ax.annotate(
                f"{y:.1f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6 if y == top else -11),
                ha="center",
                fontsize=7,
                color=color,
            )
    if log_scale_if_wide(ax, [r["perplexity"] for r in results["results"]]):
        ax.set_ylabel("perplexity (log scale)")
    else:
        ax.set_ylabel("perplexity")
    ax.set_xlabel("requested sparsity (%)")
    ax.set_title(f"{Path(str(results['model'])).name}\n{results['text']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="protocol")
    save_figure(fig, path)


def _table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    by = _rows(results)
    levels = sorted({r["sparsity"] for r in results["results"]})
    head = ["requested sparsity"]
    for proto in by:
        head += [f"{proto} perplexity", f"{proto} measured sparsity", "tokens"]
    body = []
    for p in levels:
        row = [f"{p:.0%}"]
        for rows in by.values():
            r = next((r for r in rows if r["sparsity"] == p), None)
            dense = next((d for d in rows if d["sparsity"] == 0), None)
            if r is None:
                row += ["", "", ""]
                continue
            ppl = f"{r['perplexity']:.2f}"
            if dense is not None and p > 0:
                ppl += f" ({r['perplexity'] / dense['perplexity'] - 1:+.1%})"
            row += [ppl, f"{r['measured_sparsity']:.1%}", str(r["tokens"])]
        body.append(row)
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _sample_table(samples: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    levels = sorted({s["sparsity"] for s in samples})
    prompts = list(dict.fromkeys(s["prompt"] for s in samples))
    head = ["prompt"] + ["dense" if p == 0 else f"{p:.0%} sparse" for p in levels]
    body = []
    for prompt in prompts:
        row = [prompt]
        for p in levels:
            s = next((s for s in samples if s["prompt"] == prompt and s["sparsity"] == p), None)
            row.append("" if s is None else s["text"].strip())
        body.append(row)
    return head, body


def markdown(results: dict[str, Any], run: dict[str, Any]) -> str:
    head, body = _table(results)
    out = [
        f"# teal run, {run.get('date', '')}",
        "",
        f"- model: `{results['model']}` (fingerprint `{run.get('fingerprint')}`)",
        f"- evaluation text: {results['text']}; calibration: {run.get('calibration_text')},"
        f" {run.get('calibration_tokens')} tokens",
        f"- method: {run.get('method', 'uniform')}; windows of {run.get('window')} tokens,"
        f" evaluation budget {run.get('max_tokens')} tokens per setting",
        f"- machine: {run.get('machine')}",
        f"- command: `{run.get('command')}`",
        f"- wall-clock: {run.get('seconds_total', 0):.0f} s in all"
        + "".join(f"; {k} {v:.0f} s" for k, v in run.get("timings", {}).items()),
        "",
        "## Perplexity against sparsity",
        "",
        "decode-like: each window's first half dense (prefill), second half sparse, scored"
        " on the sparse half. full: every position sparse. Measured sparsity is the"
        " weight-weighted share of projection inputs actually zeroed; percentages in brackets"
        " are the change from dense. Thresholds are quantiles of the dense model's"
        " activations; with sparsity on, later layers see inputs shifted by the earlier ones,"
        " so the measured share can exceed the requested one at high levels.",
        "",
        _md_table(head, body),
        "",
        "![perplexity against sparsity](perplexity.png)",
        "",
    ]
    samples = run.get("samples") or []
    if samples:
        sh, sb = _sample_table(samples)
        out += [
            "## Samples (greedy)",
            "",
            f"{run.get('sample_tokens')} new tokens per prompt; sparse decode steps, dense"
            " prefill.",
            "",
            _md_table(sh, sb),
            "",
        ]
    return "\n".join(out)


def html_page(results: dict[str, Any], run: dict[str, Any], png: Path | None) -> str:
    def table(head: list[str], body: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
        )
        return f"<table><tr>{th}</tr>{trs}</table>"

    img = ""
    if png is not None and png.is_file():
        data = base64.b64encode(png.read_bytes()).decode()
        img = f'<img alt="perplexity against sparsity" src="data:image/png;base64,{data}">'
    samples = run.get("samples") or []
    sample_html = ""
    if samples:
        sample_html = "<h2>Samples (greedy)</h2>" + table(*_sample_table(samples))
    info = "".join(
        f"<li>{html.escape(k)}: {html.escape(str(v))}</li>"
        for k, v in (
            ("model", results["model"]),
            ("fingerprint", run.get("fingerprint")),
            ("evaluation text", results["text"]),
            (
                "calibration",
                f"{run.get('calibration_text')}, {run.get('calibration_tokens')} tokens",
            ),
            ("machine", run.get("machine")),
            ("command", run.get("command")),
            ("wall-clock", f"{run.get('seconds_total', 0):.0f} s"),
        )
    )
    style = (
        "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.3em .6em;vertical-align:top;white-space:pre-wrap}th{background:#f3f3f3}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>teal run"
        f" {html.escape(str(run.get('date', '')))}</title><style>{style}</style></head><body>"
        f"<h1>teal run, {html.escape(str(run.get('date', '')))}</h1><ul>{info}</ul>"
        f"<h2>Perplexity against sparsity</h2>{table(*_table(results))}{img}{sample_html}"
        "</body></html>"
    )


def write_report(
    out_dir: str | os.PathLike, results: dict[str, Any], run: dict[str, Any]
) -> dict[str, Path]:
    """Write every file of the report folder; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / "results.json",
        "run": out / "run.json",
        "plot": out / "perplexity.png",
        "markdown": out / "report.md",
        "html": out / "report.html",
    }
    atomic_write(paths["results"], (json.dumps(results, indent=2) + "\n").encode())
    atomic_write(paths["run"], (json.dumps(run, indent=2) + "\n").encode())
    plot_perplexity(results, paths["plot"])
    atomic_write(paths["markdown"], markdown(results, run).encode())
    atomic_write(paths["html"], html_page(results, run, paths["plot"]).encode())
    return paths
