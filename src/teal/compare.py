"""One page comparing runs: ``teal report RUN_DIR...``.

A run is a folder written by ``teal run`` (``results.json`` + ``run.json``) or any JSON
file of ours: a ``teal eval --json`` object (perplexity or task rows) or a ``teal bench
--json``/``--out`` object (decode speed; also the ``ours`` part of the benchmark
scripts' files).  A folder may hold both kinds: every ``*.json`` in it is read.  The
page puts the quality (perplexity and task accuracy against sparsity) and speed
(tokens/s and speed-up against sparsity) of all runs side by side, in tables and plots,
as ``report.html`` (self-contained, plots embedded), ``report.md`` (plots beside it as
PNG) and ``comparison.json`` (the rows the page shows).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teal.errors import TealError
from teal.report import _md_table, atomic_write, log_scale_if_wide, save_figure


@dataclass
class Run:
    """What one run folder or file says, in the report's terms."""

    label: str
    path: str
    info: dict[str, Any] = field(default_factory=dict)  # model, date, machine, ...
    perplexity: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TealError(f"{path} is not a readable JSON file ({exc})") from None


def _add(run: Run, obj: Any, name: str) -> bool:
    """Take what ``obj`` holds into ``run``; False when it is none of our result kinds."""
    if not isinstance(obj, dict):
        return False
    if isinstance(obj.get("ours"), dict):  # benchmarks/bench_cpu.py wraps teal bench's object
        return _add(run, obj["ours"], name)
    rows = obj.get("results")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        if "fingerprint" in obj and "timings" in obj:  # run.json of teal run
            keys = ("model", "fingerprint", "dtype", "machine", "date", "method", "command")
            run.info.update({k: obj[k] for k in keys if obj.get(k) is not None})
            run.info["calibration"] = (
                f"{obj.get('calibration_text')}, {obj.get('calibration_tokens')} tokens"
            )
            return True
        return False
    if rows and "tokens_per_second" in rows[0]:
        for r in rows:
            run.speed.append(
                {
                    "device": obj.get("device"),
                    "model": obj.get("model"),
                    "dtype": obj.get("dtype"),
                    "method": obj.get("method", "uniform"),
                    "engine": obj.get("engine"),
                    "sparsity": float(r["sparsity"]),
                    "measured_sparsity": r.get("measured_sparsity"),
                    "tokens_per_second": float(r["tokens_per_second"]),
                    "speedup": r.get("speedup_vs_dense"),
                    "path": r.get("path"),
                }
            )
        run.info.setdefault("model", obj.get("model"))
        run.info.setdefault("machine", obj.get("device"))
        run.info.setdefault("date", obj.get("date"))
        return True
    if rows and "accuracy" in rows[0]:
        run.tasks += [{**r, "method": r.get("method", "uniform")} for r in rows]
    elif rows and "perplexity" in rows[0]:
        run.perplexity += [{**r, "method": r.get("method", "uniform")} for r in rows]
    elif rows:
        return False
    run.info.setdefault("model", obj.get("model"))
    if obj.get("text"):
        run.info.setdefault("evaluation", obj.get("text"))
    return True


def load_run(path: str | os.PathLike) -> Run:
    """A run folder (every ``*.json`` in it) or one JSON file."""
    p = Path(path)
    if not p.exists():
        raise TealError(f"{p} does not exist: give run folders (from `teal run`) or JSON files")
    run = Run(label=p.name if p.is_dir() else p.stem, path=str(p))
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    used = [f for f in files if _add(run, _read_json(f), f.name)]
    if not used or not (run.perplexity or run.tasks or run.speed):
        raise TealError(
            f"{p} holds no teal results (results.json of `teal run`, `teal eval --json` or"
            " `teal bench --json` output)"
        )
    return run


def _unique_labels(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        n = seen.get(r.label, 0)
        seen[r.label] = n + 1
        if n:
            r.label = f"{r.label} ({n + 1})"


# ----------------------------------------------------------------------------- tables


def _levels(rows: list[dict[str, Any]]) -> list[float]:
    return sorted({float(r["sparsity"]) for r in rows})


def _pct(p: float) -> str:
    return f"{100 * p:g} %"


def perplexity_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    levels = _levels([r for run in runs for r in run.perplexity])
    head = ["run", "method", "protocol"] + [_pct(p) for p in levels]
    body = []
    for run in runs:
        groups: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
        for r in run.perplexity:
            groups.setdefault((r["method"], r["protocol"]), {})[float(r["sparsity"])] = r
        for (method, proto), by in groups.items():
            dense = by.get(0.0)
            row = [run.label, method, proto]
            for p in levels:
                r = by.get(p)
                if r is None:
                    row.append("")
                    continue
                cell = f"{r['perplexity']:.2f}"
                if dense is not None and p > 0:
                    cell += f" ({r['perplexity'] / dense['perplexity'] - 1:+.1%})"
                if p > 0 and r.get("measured_sparsity") is not None:
                    cell += f" [{r['measured_sparsity']:.1%}]"
                row.append(cell)
            body.append(row)
    return head, body


def task_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    levels = _levels([r for run in runs for r in run.tasks])
    head = ["run", "method", "task"] + [_pct(p) for p in levels]
    body = []
    for run in runs:
        groups: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
        for r in run.tasks:
            groups.setdefault((r["method"], r["task"]), {})[float(r["sparsity"])] = r
        for (method, task), by in groups.items():
            row = [run.label, method, task]
            for p in levels:
                r = by.get(p)
                row.append("" if r is None else f"{r['accuracy']:.3f} / {r['accuracy_norm']:.3f}")
            body.append(row)
    return head, body


def _speed_groups(run: Run) -> dict[tuple[str, ...], dict[float, dict[str, Any]]]:
    """Per (device, dtype, method): the fastest row at each level (at 0 that is the
    faster dense path, the one speed-ups are measured against)."""
    groups: dict[tuple[str, ...], dict[float, dict[str, Any]]] = {}
    for r in run.speed:
        key = (str(r["device"]), str(r["dtype"]), str(r["method"]))
        by = groups.setdefault(key, {})
        old = by.get(r["sparsity"])
        if old is None or r["tokens_per_second"] > old["tokens_per_second"]:
            by[r["sparsity"]] = r
    return groups


def speed_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    levels = _levels([r for run in runs for r in run.speed])
    head = ["run", "device", "dtype", "method"] + [_pct(p) for p in levels]
    body = []
    for run in runs:
        for (device, dtype, method), by in _speed_groups(run).items():
            row = [run.label, device, dtype, method]
            for p in levels:
                r = by.get(p)
                if r is None:
                    row.append("")
                    continue
                cell = f"{r['tokens_per_second']:.1f} tok/s"
                if p > 0 and r.get("speedup") is not None:
                    cell += f" ({r['speedup']:.2f}x)"
                row.append(cell)
            body.append(row)
    return head, body


def runs_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    keys = ("model", "date", "machine", "dtype", "method", "calibration", "evaluation")
    head = ["run", *keys, "folder or file"]
    body = [[run.label, *(str(run.info.get(k) or "") for k in keys), run.path] for run in runs]
    return head, body


# ----------------------------------------------------------------------------- plots


def plot_quality(runs: list[Run], path: Path) -> bool:
    """Perplexity against requested sparsity, one panel per protocol, one line per run
    and method."""
    rows = [r for run in runs for r in run.perplexity]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    fig, axes = plt.subplots(
        1, len(protocols), figsize=(5.6 * len(protocols), 4.2), dpi=110, squeeze=False
    )
    for ax, proto in zip(axes[0], protocols):
        values = []
        for run in runs:
            methods = list(dict.fromkeys(r["method"] for r in run.perplexity))
            for m in methods:
                pts = sorted(
                    (r["sparsity"], r["perplexity"])
                    for r in run.perplexity
                    if r["method"] == m and r["protocol"] == proto
                )
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot([100 * x for x in xs], ys, marker="o", label=f"{run.label}: {m}")
                    values += ys
        log_scale_if_wide(ax, values)
        ax.set_title(f"perplexity, {proto} protocol", fontsize=10)
        ax.set_xlabel("requested sparsity (%)")
        ax.set_ylabel("perplexity" + (" (log scale)" if ax.get_yscale() == "log" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def plot_speed(runs: list[Run], path: Path) -> bool:
    """Tokens/s and speed-up over dense against requested sparsity."""
    if not any(run.speed for run in runs):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.2, 4.2), dpi=110)
    for run in runs:
        for (device, dtype, method), by in _speed_groups(run).items():
            pts = sorted(by.items())
            label = f"{run.label}: {method}, {dtype}, {device}"
            xs = [100 * p for p, _ in pts]
            left.plot(xs, [r["tokens_per_second"] for _, r in pts], marker="o", label=label)
            dense = by.get(0.0)
            if dense is not None:
                right.plot(
                    xs,
                    [r["tokens_per_second"] / dense["tokens_per_second"] for _, r in pts],
                    marker="o",
                    label=label,
                )
    left.set_title("decode speed", fontsize=10)
    left.set_ylabel("tokens/s")
    right.set_title("speed-up over dense", fontsize=10)
    right.set_ylabel("x dense")
    right.axhline(1.0, color="grey", lw=0.8)
    for ax in (left, right):
        ax.set_xlabel("requested sparsity (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def plot_tasks(runs: list[Run], path: Path) -> bool:
    if not any(run.tasks for run in runs):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for run in runs:
        keys = list(dict.fromkeys((r["method"], r["task"]) for r in run.tasks))
        for m, task in keys:
            pts = sorted(
                (r["sparsity"], r["accuracy"])
                for r in run.tasks
                if r["method"] == m and r["task"] == task
            )
            xs, ys = zip(*pts)
            ax.plot([100 * x for x in xs], ys, marker="o", label=f"{run.label}: {m}, {task}")
    ax.set_title("multiple-choice accuracy", fontsize=10)
    ax.set_xlabel("requested sparsity (%)")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------- page

_NOTES = {
    "perplexity": "Cells: perplexity (change from the same run's dense) [measured"
    " weight-weighted sparsity]. decode-like: each window's first half dense, second half"
    " sparse, scored on the sparse half; full: every position sparse.",
    "tasks": "Cells: accuracy / length-normalised accuracy.",
    "speed": "Cells: decode tokens/s at batch 1 (speed-up over the faster dense path of the"
    " same run). Speed is comparable only between runs on the same device.",
}


def _sections(runs: list[Run]) -> list[tuple[str, str, tuple[list[str], list[list[str]]], str]]:
    """(title, note, table, plot file) for each section with data."""
    out = [("Runs", "", runs_table(runs), "")]
    if any(r.perplexity for r in runs):
        out.append(("Perplexity", _NOTES["perplexity"], perplexity_table(runs), "quality.png"))
    if any(r.tasks for r in runs):
        out.append(("Multiple-choice tasks", _NOTES["tasks"], task_table(runs), "tasks.png"))
    if any(r.speed for r in runs):
        out.append(("Decode speed", _NOTES["speed"], speed_table(runs), "speed.png"))
    return out


def markdown(runs: list[Run], sections: list, plots: dict[str, Path], date: str) -> str:
    out = [f"# teal report, {date}", "", f"{len(runs)} runs compared.", ""]
    for title, note, (head, body), plot in sections:
        out += [f"## {title}", ""]
        if note:
            out += [note, ""]
        out += [_md_table(head, body), ""]
        if plot in plots:
            out += [f"![{title}]({plot})", ""]
    return "\n".join(out)


def html_page(runs: list[Run], sections: list, plots: dict[str, Path], date: str) -> str:
    def table(head: list[str], body: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
        )
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    parts = []
    for title, note, (head, body), plot in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        parts.append(table(head, body))
        if plot in plots:
            data = base64.b64encode(plots[plot].read_bytes()).decode()
            parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:90em;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}"
        "th{background:#f3f3f3;text-align:left}tbody tr:nth-child(even){background:#fafafa}"
        "img{max-width:100%;display:block;margin:1em 0}.note{color:#555;max-width:60em}"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>teal report {html.escape(date)}</title><style>{style}</style></head><body>"
        f"<h1>teal report, {html.escape(date)}</h1><p>{len(runs)} runs compared.</p>"
        + "".join(parts)
        + "</body></html>"
    )


def write_comparison(paths: list[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read the runs, write the page and its files under ``out_dir``; returns a summary
    (file paths, and per run what it held)."""
    if not paths:
        raise TealError("give at least one run folder or results file")
    runs = [load_run(p) for p in paths]
    _unique_labels(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    plots = {}
    for name, fn in (("quality.png", plot_quality), ("tasks.png", plot_tasks),
                     ("speed.png", plot_speed)):  # fmt: skip
        if fn(runs, out / name):
            plots[name] = out / name
    sections = _sections(runs)
    files = {"html": out / "report.html", "markdown": out / "report.md"}
    files["json"] = out / "comparison.json"
    data = {
        "date": date,
        "runs": [
            {"label": r.label, "path": r.path, "info": r.info, "perplexity": r.perplexity,
             "tasks": r.tasks, "speed": r.speed}
            for r in runs
        ],
    }  # fmt: skip
    atomic_write(files["json"], (json.dumps(data, indent=1) + "\n").encode())
    atomic_write(files["markdown"], markdown(runs, sections, plots, date).encode())
    atomic_write(files["html"], html_page(runs, sections, plots, date).encode())
    return {
        **{k: str(v) for k, v in files.items()},
        "plots": [str(p) for p in plots.values()],
        "runs": [
            {"label": r.label, "path": r.path, "perplexity_rows": len(r.perplexity),
             "task_rows": len(r.tasks), "speed_rows": len(r.speed)}
            for r in runs
        ],
    }  # fmt: skip
