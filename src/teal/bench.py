"""Decode speed of our model: tokens per second, dense against sparse, in one run.

``bench_decode(model, ...)`` returns one JSON-able object (the format of ``teal bench
--json``)::

    {"device", "model", "dtype", "quant", "method", "threads", "torch", "date", "kernel",
     "results": [{"sparsity", "measured_sparsity", "tokens_per_second",
                  "compile_seconds", "dense_projections", "path", ...}, ...]}

How it measures (PERFORMANCE.md): batch 1, greedy, a short prompt, ``new_tokens``
decode steps after a dense prefill (prefill excluded), the same prompt and thread
count for every row; the rows are run in interleaved rounds (dense, 25 %, 40 %, ...,
then again) so that a slow moment of the machine hits all of them alike, and each row
reports the median round.  Sparsity 0 is measured twice: through the model's plain
dense path (``x @ wt``, torch's BLAS) and through the sparse kernel with every channel
kept; speed-ups are taken against the faster of the two, so a slow baseline never
flatters sparsity.  The measured sparsity of each row is counted on the very tokens it
generated (an untimed replay with the model's observer), weight-weighted over the seven
projections.

Engines are pluggable by device: ``ENGINES["cpu"]`` is the eager loop below (the CPU
backend's one-call kernels keep its per-token overhead small); a GPU engine registers
itself under ``"cuda"`` with the same two methods.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from teal.engine.sampling import sample
from teal.errors import TealError
from teal.model.build import DTYPE_NAMES
from teal.model.decoder import PROJECTIONS, SITE_PROJECTIONS, Transformer

PROMPT = "The history of the city begins in the Roman period, when"


# ----- engines ---------------------------------------------------------------------------


class Engine(Protocol):
    """Generates greedily from a prompt and times the decode steps."""

    name: str

    def prepare(self, model: Transformer) -> float:
        """Get ready for the model's current sparsity setting; returns compile seconds."""
        ...

    def generate(self, prompt: Tensor, new_tokens: int) -> tuple[list[int], float]:
        """``new_tokens`` greedy tokens after ``prompt`` ``[1, T]``: (tokens, seconds
        spent in the ``new_tokens - 1`` decode steps; prefill excluded)."""
        ...


@dataclass
class CpuEngine:
    """The eager decode loop on the CPU: dense prefill, then one-token steps on the
    static cache.  Nothing is allocated per step that the model does not allocate
    itself: the position lives in one tensor updated in place and the next token stays
    a tensor (no host round trip per step)."""

    model: Transformer
    max_len: int
    name: str = "cpu-eager"

    def prepare(self, model: Transformer) -> float:
        return 0.0

    @torch.inference_mode()
    def generate(self, prompt: Tensor, new_tokens: int) -> tuple[list[int], float]:
        model = self.model
        n = prompt.shape[1]
        if n + new_tokens > self.max_len:
            raise TealError(f"{n} + {new_tokens} positions exceed the engine's {self.max_len}")
        if model.cache_len != self.max_len:
            model.setup_cache(1, self.max_len)
        logits = model(prompt, torch.arange(n))
        tok = sample(logits[:, -1]).view(1, 1)
        out = [tok]
        pos = torch.tensor([n])
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = model(tok, pos)
            tok = sample(logits[:, -1]).view(1, 1)
            out.append(tok)
            pos.add_(1)
        seconds = time.perf_counter() - t0
        return torch.cat(out).flatten().tolist(), seconds


class CudaGraphEngine:
    """``teal.engine.cuda.CudaEngine`` behind the bench protocol: each decode step is one
    replay of a captured CUDA graph (compiled blocks, sampling and position update
    inside), one graph per sparsity mode; the thresholds live in a device buffer, so
    moving between sparsity levels needs no recapture."""

    name = "cuda-graph"

    def __init__(self, model: Transformer, max_len: int) -> None:
        from teal.engine.cuda import CudaEngine

        self.engine = CudaEngine(model, max_len)

    def prepare(self, model: Transformer) -> float:
        return self.engine.capture()

    def generate(self, prompt: Tensor, new_tokens: int) -> tuple[list[int], float]:
        timing = self.engine.generate(prompt, new_tokens)
        return timing.tokens.tolist(), timing.decode_seconds


def _cpu_engine(model: Transformer, max_len: int) -> Engine:
    return CpuEngine(model, max_len)


def _cuda_engine(model: Transformer, max_len: int) -> Engine:
    if model.device.type != "cuda":
        raise TealError("--device cuda needs the model on a CUDA GPU")
    return CudaGraphEngine(model, max_len)


# device -> engine factory; None would mean: no engine for that device in this build.
ENGINES: dict[str, Callable[[Transformer, int], Engine] | None] = {
    "cpu": _cpu_engine,
    "cuda": _cuda_engine,
}


def require_engine(device: str) -> Callable[[Transformer, int], Engine]:
    """The engine factory for ``device``, or an error that says what to do."""
    if device not in ENGINES:
        raise TealError(f"unknown device {device!r}: expected one of {', '.join(ENGINES)}")
    factory = ENGINES[device]
    if factory is None:
        raise TealError(
            f"the {device.upper()} decode engine is not in this build of `teal bench` yet:"
            " use --device cpu"
        )
    return factory


# ----- thresholds and measured sparsity --------------------------------------------------


def calibration_thresholds(
    model: Transformer,
    sparsities: Iterable[float],
    method: str = "uniform",
    *,
    calibration: Any = None,
    random_tokens: int = 2048,
    progress: bool = True,
) -> dict[float, Tensor]:
    """Thresholds ``[n_layers, 7]`` per requested sparsity (> 0).

    ``calibration`` (a ``Calibration``) if given; else a model with a tokenizer uses the
    cached calibration on the default text (made first if missing); a random-weight model
    is calibrated on itself with random tokens, so that its measured sparsity hits the
    target (its activations have nothing to do with any text)."""
    from teal.sparsity.methods import thresholds_for

    levels = [float(p) for p in sparsities if p > 0]
    if not levels:
        return {}
    if calibration is None:
        if model.tokenizer is not None and not str(model.source or "").startswith("random"):
            from teal.eval.corpus import load_corpus
            from teal.sparsity.calibrate import cached_or_new

            part = load_corpus(None).part("calibration")
            calibration, _ = cached_or_new(model, part, progress=progress)
        else:
            from teal.sparsity.artifact import Calibration
            from teal.sparsity.stats import collect_stats

            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(0, model.config.vocab_size, (random_tokens,), generator=gen)
            stats = collect_stats(
                model, ids.to(model.device), seq_len=min(512, random_tokens), progress=progress
            )
            calibration = Calibration(stats, {"text": {"name": "random-tokens"}})
    return {p: thresholds_for(calibration, method, p) for p in levels}


def projection_weights(model: Transformer) -> Tensor:
    """Weights per projection (q, k, v, o, gate, up, down) of one layer, float64."""
    shapes = model.config.projection_shapes
    return torch.tensor([k * n for k, n in (shapes[p] for p in PROJECTIONS)], dtype=torch.float64)


@contextmanager
def count_dropped(model: Transformer, thresholds: Tensor):
    """While active, counts at every decode step the share of each projection's inputs
    that its threshold drops; yields a function returning the weight-weighted mean."""
    cfg = model.config
    # Counted where the activations live (no host sync per site on a GPU).
    dev = model.device
    thr = thresholds.to(dev, torch.float32)
    dropped = torch.zeros(cfg.n_layers, len(PROJECTIONS), dtype=torch.float64, device=dev)
    steps = torch.zeros(cfg.n_layers, len(PROJECTIONS), dtype=torch.float64, device=dev)
    scales = model.sparse_scales

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        if x.shape[1] != 1:
            return  # the prefill is dense
        score = x.detach().abs()
        if scales is not None and scales[layer].get(site) is not None:
            score = score * scales[layer][site].to(x.dtype)
        for j in SITE_PROJECTIONS[site]:
            # In x's dtype, as the kernels compare (the threshold rounded to it).
            t = thr[layer, j].to(x.dtype)
            dropped[layer, j] += (score <= t).double().mean()
            steps[layer, j] += 1

    def share() -> float:
        w = projection_weights(model)
        frac = (dropped / steps.clamp(min=1)).cpu()
        return float((frac * w).sum() / (w.sum() * cfg.n_layers))

    saved = model.observer
    model.observer = observe
    try:
        yield share
    finally:
        model.observer = saved


def ideal_speedup(model: Transformer, sparsity: float) -> float:
    """1 / (1 - p f): f is the share of per-token weight bytes in the seven projections
    (the lm_head stays dense; the embedding lookup reads one row)."""
    cfg = model.config
    proj = cfg.projection_params
    head = cfg.vocab_size * cfg.dim
    f = proj / (proj + head)
    return 1.0 / (1.0 - sparsity * f)


# ----- the benchmark ---------------------------------------------------------------------


@dataclass
class _Row:
    sparsity: float
    path: str  # "dense-matmul" (the model's x @ wt) or "<backend>-kernel"
    thresholds: Tensor | None
    runs: list[float]
    tokens: list[int]


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _prompt_ids(model: Transformer, prompt: str | list[int] | None) -> Tensor:
    if isinstance(prompt, list):
        ids = prompt
    elif model.tokenizer is not None:
        ids = model.tokenizer(prompt or PROMPT, add_special_tokens=True)["input_ids"]
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (12,), generator=gen).tolist()
    return torch.tensor([list(ids)], dtype=torch.long, device=model.device)


def _set_mode(model: Transformer, row: _Row, backend: str) -> None:
    if row.thresholds is None:
        # The plain torch path: a dense step on the CPU backend would otherwise run the
        # native kernel keeping every channel (the "cpu-kernel" row at p = 0).
        model.clear_sparsity()
        model.set_backend("torch")
    else:
        model.set_sparsity(row.thresholds, mode="decode")
        model.set_backend(backend)


def bench_decode(
    model: Transformer,
    *,
    device: str = "cpu",
    sparsities: Iterable[float] = (0.0, 0.25, 0.4, 0.5),
    new_tokens: int = 256,
    threads: int | None = None,
    thresholds: dict[float, Tensor] | None = None,
    method: str = "uniform",
    repeats: int = 3,
    prompt: str | list[int] | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Decode tokens/s of ``model`` at each sparsity, same run, same threads.

    ``thresholds`` maps each sparsity > 0 to ``[n_layers, 7]``; missing ones come from
    ``calibration_thresholds``.  ``threads`` sets torch's intra-op threads for the run
    (default: as many as torch uses now) and is restored afterwards."""
    factory = require_engine(device)
    if new_tokens < 2:
        raise TealError("new_tokens must be at least 2 (one prefill token, one decode step)")
    if repeats < 1:
        raise TealError("repeats must be at least 1")
    levels = sorted({float(p) for p in sparsities})
    for p in levels:
        if not 0.0 <= p < 1.0:
            raise TealError(f"sparsity must be in [0, 1), got {p}")
    backend = "cpu" if device == "cpu" else "triton"
    old_threads = torch.get_num_threads()
    threads = threads or old_threads
    if threads < 1:
        raise TealError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    old_backend = model.sparse_backend
    try:
        prompt_ids = _prompt_ids(model, prompt)
        engine = factory(model, prompt_ids.shape[1] + new_tokens)
        table = dict(thresholds or {})
        missing = [p for p in levels if p > 0 and p not in table]
        if missing:
            table.update(calibration_thresholds(model, missing, method, progress=progress))
        rows = _plan_rows(model, levels, table, backend)
        compile_s = _run_rounds(model, engine, rows, prompt_ids, new_tokens, repeats, backend,
                                progress)  # fmt: skip
        results = _results(model, engine, rows, prompt_ids, backend, compile_s, method)
    finally:
        model.clear_sparsity()
        model.clear_cache()
        model.set_backend(old_backend)
        torch.set_num_threads(old_threads)
    kernel = "triton"
    if device != "cpu":
        from teal.kernels.triton_gemv import pdl_mode

        if pdl_mode(torch.device(device)):
            kernel = "triton+pdl"  # programmatic dependent launch (TEAL_PDL=0 turns it off)
    if device == "cpu":
        from teal.kernels import cpu

        kernel = cpu.implementation()
        if kernel == "native":
            kernel += f"-{cpu.isa()}"  # the vector width it was built for
    return {
        "device": _device_name(device),
        "model": model_name or model.source,
        "dtype": DTYPE_NAMES.get(model.dtype, str(model.dtype)),
        "quant": model.quant.label() if getattr(model, "quant", None) else None,
        "method": method,
        "threads": threads,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "engine": engine.name,
        "kernel": kernel,
        "new_tokens": new_tokens,
        "prompt_tokens": int(prompt_ids.shape[1]),
        "repeats": repeats,
        "results": results,
    }


def _plan_rows(
    model: Transformer, levels: list[float], table: dict[float, Tensor], backend: str
) -> list[_Row]:
    rows = []
    # A quantized model's torch path on the CPU dequantizes every weight at every step:
    # a reference, not a way to decode, so it gets no row there.
    matmul = not (backend == "cpu" and getattr(model, "quant", None) is not None)
    for p in levels:
        if p == 0:
            if matmul:
                rows.append(_Row(0.0, "dense-matmul", None, [], []))
            # The kernel keeping every channel: a threshold below any |x|.
            keep_all = torch.full((model.config.n_layers, len(PROJECTIONS)), -1.0)
            rows.append(_Row(0.0, f"{backend}-kernel", keep_all, [], []))
        else:
            rows.append(_Row(p, f"{backend}-kernel", table[p], [], []))
    return rows


def _run_rounds(
    model: Transformer,
    engine: Engine,
    rows: list[_Row],
    prompt: Tensor,
    new_tokens: int,
    repeats: int,
    backend: str,
    progress: bool,
) -> dict[int, float]:
    from tqdm import tqdm

    compile_s: dict[int, float] = {}
    bar = tqdm(
        total=len(rows) * (repeats + 1),
        desc="decode runs",
        unit="run",
        file=sys.stderr,
        disable=not progress,
    )
    with bar:
        for i, row in enumerate(rows):  # warm-up (and compile, for engines that do)
            _set_mode(model, row, backend)
            compile_s[i] = engine.prepare(model)
            engine.generate(prompt, min(new_tokens, 16))
            bar.update(1)
        for _ in range(repeats):
            for row in rows:
                _set_mode(model, row, backend)
                engine.prepare(model)
                tokens, seconds = engine.generate(prompt, new_tokens)
                row.runs.append((new_tokens - 1) / seconds)
                row.tokens = tokens
                bar.set_postfix_str(f"{row.path} p={row.sparsity:g}: {row.runs[-1]:.1f} tok/s")
                bar.update(1)
    model.clear_sparsity()
    return compile_s


def _results(
    model: Transformer,
    engine: Engine,
    rows: list[_Row],
    prompt: Tensor,
    backend: str,
    compile_s: dict[int, float],
    method: str,
) -> list[dict[str, Any]]:
    # CATS computes gate and up densely on the reference path (its mask comes from the
    # activated gate): say so rather than let the row pass for all-sparse.
    sparse_dense = ["gate", "up"] if method == "cats" else []
    out = []
    for i, row in enumerate(rows):
        measured = 0.0
        if row.thresholds is not None and row.sparsity > 0:
            _set_mode(model, row, backend)
            with count_dropped(model, row.thresholds) as share:
                _replay(model, prompt, row.tokens, engine)
            measured = share()
        out.append(
            {
                "sparsity": row.sparsity,
                "measured_sparsity": round(measured, 4),
                "tokens_per_second": round(statistics.median(row.runs), 2),
                "runs": [round(r, 2) for r in row.runs],
                "compile_seconds": round(compile_s.get(i, 0.0), 2),
                "dense_projections": (
                    sparse_dense if row.thresholds is not None else list(PROJECTIONS)
                ),
                "path": row.path,
            }
        )
    model.clear_sparsity()
    dense = max((r["tokens_per_second"] for r in out if r["sparsity"] == 0), default=None)
    for r in out:
        if dense:
            r["speedup_vs_dense"] = round(r["tokens_per_second"] / dense, 3)
            ideal = ideal_speedup(model, r["sparsity"])
            r["ideal_speedup"] = round(ideal, 3)
            r["share_of_ideal"] = round(r["speedup_vs_dense"] / ideal, 3)
            # The thresholds may drop more (or less) than asked on the generated text:
            # the ideal at the sparsity actually measured is the stricter yardstick.
            at = ideal_speedup(model, r["measured_sparsity"]) if r["sparsity"] else 1.0
            r["share_of_ideal_at_measured"] = round(r["speedup_vs_dense"] / at, 3)
    return out


@torch.inference_mode()
def _replay(model: Transformer, prompt: Tensor, tokens: list[int], engine: Engine) -> None:
    """Run the timed row's decode steps again, eagerly and fed with the tokens it
    generated (so the observer sees every step, even where the timed engine replays a
    graph), for the measured sparsity.  Each step's greedy choice is checked against the
    recorded next token where the eager step is the timed one (the CPU loop)."""
    n = prompt.shape[1]
    max_len = n + len(tokens)
    if model.cache_len < max_len:
        model.setup_cache(1, max_len)
    model(prompt, torch.arange(n, device=prompt.device))
    check = isinstance(engine, CpuEngine)
    for i, tok in enumerate(tokens[:-1]):
        step = torch.tensor([[tok]], device=prompt.device)
        logits = model(step, torch.tensor([n + i], device=prompt.device))
        if check and int(logits[0, -1].argmax()) != tokens[i + 1]:
            # Greedy decoding is deterministic: the same steps must choose the same tokens.
            raise RuntimeError("the replay with the observer chose other tokens")


def format_table(result: dict[str, Any]) -> str:
    """The result as a table a person reads."""
    lines = [
        f"{result['model']}  {result['dtype']}  on {result['device']}",
        f"threads {result['threads']}, {result['new_tokens']} new tokens, median of"
        f" {result['repeats']}, torch {result['torch']}, kernel {result.get('kernel')},"
        f" {result['date']}",
        f"{'sparsity':>8}  {'measured':>8}  {'path':<14} {'tok/s':>8}  {'speed-up':>8}"
        f"  {'ideal':>6}  {'of ideal':>8}  {'of ideal at measured':>20}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['sparsity']:>8.2f}  {r['measured_sparsity']:>8.3f}  {r['path']:<14}"
            f" {r['tokens_per_second']:>8.2f}  {r.get('speedup_vs_dense', 0):>7.2f}x"
            f"  {r.get('ideal_speedup', 0):>5.2f}x  {r.get('share_of_ideal', 0):>8.2f}"
            f"  {r.get('share_of_ideal_at_measured', 0):>20.2f}"
        )
    return "\n".join(lines)
