"""Multiple-choice accuracy by log-likelihood: each choice is scored as the sum of its
tokens' log-probabilities after the question; the prediction is the best choice
(``accuracy``), or the best per character of the choice (``accuracy_norm``, like
lm-eval's ``acc_norm``, which spares long answers their longer sums).

Tasks are BIG-bench JSON tasks (by name, read out of the ``bigbench==1.0.0`` sdist on
PyPI, never installed; or by path to a ``task.json``) or a user's JSONL file with one
``{"question", "choices", "answer"}`` per line (``answer``: index or choice text).

Under sparsity every position is sparse (as when a sparsified model is evaluated with
lm-eval): scoring a one-token answer after a dense prefill would not see sparsity at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from teal.errors import TealError

BIGBENCH = ("bigbench", "1.0.0")
# Pinned task files of the sdist (zero-shot multiple choice, short inputs).  All are
# fetched in one download of the 358 MB archive, so asking for another one later does
# not download it again.
BIGBENCH_TASKS = {
    "anachronisms": "864b2377906bbd2e6feaa3d0b9b605377529d8a637867b278cd486722b179b55",
    "general_knowledge": "7d8f07136b3539d5555f0452355fed441d94f02edf730745a772f2c612ce3445",
    "hyperbaton": "8cd85fac8281210a1276a82fddd493a27b0484b84ddf65f0b4f9b4476d6233e2",
    "misconceptions": "f6091db702cb3f3f699c570f732828283a85dbf137b1e1a65b7bcbbe98ebe6db",
    "sports_understanding": "925617612d19ca02d7b13bfb263300cc13701dca8851151a77be8ce986feadab",
    "strategyqa": "60af9081fed20102fd8bb1e02dc7d9f12238efcba33e4c1a56b4d61cb6409803",
    "navigate": "e076d286bb54c9304de99c24a8d3ddd749be78c12af5d58315195b194c8efa18",
    "physical_intuition": "dd1e8e8fe97e08d064788eed8fb0f1bd13013d5fa028617bdf418685f4ca726f",
}
DEFAULT_TASKS = ("anachronisms", "general_knowledge", "misconceptions", "sports_understanding")


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    correct: frozenset[int]  # indices of the right choices (BIG-bench allows ties)


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]


@dataclass
class ChoiceResult:
    """One task row of ``teal eval --json``."""

    method: str
    task: str
    sparsity: float
    measured_sparsity: float
    accuracy: float
    accuracy_norm: float
    examples: int

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "task": self.task,
            "sparsity": self.sparsity,
            "measured_sparsity": round(self.measured_sparsity, 4),
            "accuracy": round(self.accuracy, 4),
            "accuracy_norm": round(self.accuracy_norm, 4),
            "examples": self.examples,
        }


def _bigbench_files():
    from teal.data.packages import PackageFile

    return [
        PackageFile(
            BIGBENCH[0],
            BIGBENCH[1],
            f"bigbench/benchmark_tasks/{name}/task.json",
            sha or None,
            f"bigbench-{BIGBENCH[1]}/{name}/task.json",
            "358 MB sdist",
        )
        for name, sha in BIGBENCH_TASKS.items()
    ]


def load_task(name_or_path: str) -> Task:
    """A BIG-bench task by name (pinned ones), or a path to a BIG-bench ``task.json``
    or a JSONL file of ``{"question", "choices", "answer"}``."""
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            return _jsonl_task(path)
        return _bigbench_task(path.parent.name if path.name == "task.json" else path.stem, path)
    if name_or_path in BIGBENCH_TASKS:
        from teal.data.packages import fetch_package_files

        files = _bigbench_files()
        paths = fetch_package_files(files)
        return _bigbench_task(name_or_path, paths[list(BIGBENCH_TASKS).index(name_or_path)])
    raise TealError(
        f"no task {name_or_path!r}: give a BIG-bench task name ({', '.join(BIGBENCH_TASKS)}),"
        " a path to a BIG-bench task.json, or a JSONL file of"
        ' {"question", "choices", "answer"} lines'
    )


def _bigbench_task(name: str, path: Path) -> Task:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TealError(f"{path} is not a BIG-bench JSON task: {exc}") from None
    prefix = str(data.get("task_prefix", ""))
    q_prefix = data.get("example_input_prefix", "\nQ: ")
    a_prefix = data.get("example_output_prefix", "\nA: ")
    c_prefix = data.get("choice_prefix", "\n  choice: ")
    append = data.get("append_choices_to_input", True)
    out = []
    for ex in data.get("examples", []):
        scores = ex.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            continue
        choices = tuple(scores)
        best = max(scores.values())
        text = ex["input"]
        if append:  # BIG-bench shuffles them with a seed; sorted order is deterministic
            text += c_prefix + c_prefix.join(sorted(choices))
        context = prefix + q_prefix + text + a_prefix
        correct = frozenset(i for i, c in enumerate(choices) if scores[c] == best)
        out.append(Example(context, choices, correct))
    if not out:
        raise TealError(f"{path} has no multiple-choice examples (target_scores)")
    return Task(name, tuple(out))


def _jsonl_task(path: Path) -> Task:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            q, choices, ans = obj["question"], [str(c) for c in obj["choices"]], obj["answer"]
        except (ValueError, KeyError, TypeError):
            raise TealError(
                f'{path} line {n}: expected {{"question", "choices", "answer"}} as JSON'
            ) from None
        idx = choices.index(ans) if isinstance(ans, str) and ans in choices else ans
        if not isinstance(idx, int) or not 0 <= idx < len(choices) or len(choices) < 2:
            raise TealError(f"{path} line {n}: answer must be a choice or its index")
        out.append(Example(f"{q}\nAnswer:", tuple(choices), frozenset({idx})))
    if not out:
        raise TealError(f"{path} holds no questions")
    return Task(path.stem, tuple(out))


def _encode(tok, model, ex: Example) -> list[tuple[list[int], list[int]]]:
    from teal.eval.corpus import bos_token

    bos = bos_token(tok)
    ctx = tok(ex.context, add_special_tokens=False, verbose=False)["input_ids"]
    if bos is not None:
        ctx = [bos, *ctx]
    out = []
    for c in ex.choices:
        cont = c if ex.context[-1:].isspace() or c[:1].isspace() else " " + c
        ids = tok(cont, add_special_tokens=False, verbose=False)["input_ids"]
        room = model.config.max_seq_len - len(ids)
        out.append((ctx[-room:], ids))  # keep the end of an over-long question
    return out


@torch.inference_mode()
def score_task(
    model,
    task: Task,
    *,
    limit: int | None = None,
    method: str = "uniform",
    sparsity: float = 0.0,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> ChoiceResult:
    """Accuracy of ``model`` as it is set (dense, or sparse via ``set_sparsity``) on
    the first ``limit`` examples of ``task``."""
    from tqdm.auto import tqdm

    from teal.eval.perplexity import SparsityMeter
    from teal.model.lowrank import model_overhead

    sparse = model.sparse_mode != "off"
    meter = SparsityMeter(
        model.config,
        model.thresholds if sparse else torch.zeros_like(model.thresholds),
        model.sparse_scales if sparse else None,
        overhead=model_overhead(model) if sparse else 0.0,
    )
    examples = task.examples[:limit] if limit else task.examples
    seqs = []  # (example, choice, context ids, continuation ids)
    for e, ex in enumerate(examples):
        for c, (ctx, cont) in enumerate(_encode(model.tokenizer, model, ex)):
            seqs.append((e, c, ctx, cont))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]) + len(seqs[i][3]))
    logp = [[0.0] * len(ex.choices) for ex in examples]
    saved_observer, saved_mode = model.observer, model.sparse_mode
    model.observer = meter
    if sparse:
        model.sparse_mode = "decode"  # the per-position mask below decides
    try:
        i = 0
        with tqdm(total=len(seqs), desc=f"{task.name}", disable=not progress) as bar:
            while i < len(order):
                longest = len(seqs[order[i]][2]) + len(seqs[order[i]][3])
                j = i + 1
                while j < len(order):
                    n = len(seqs[order[j]][2]) + len(seqs[order[j]][3])
                    if n * (j - i + 1) > batch_tokens:
                        break
                    longest, j = n, j + 1
                group = [seqs[k] for k in order[i:j]]
                ids = torch.zeros(len(group), longest, dtype=torch.int64)
                real = torch.zeros(len(group), longest, dtype=torch.bool)
                for r, (_, _, ctx, cont) in enumerate(group):
                    row = ctx + cont
                    ids[r, : len(row)] = torch.tensor(row)
                    real[r, : len(row)] = True
                # Right padding never reaches real positions under the causal mask.
                mask = real.to(model.device) if sparse else None
                logits = model(ids.to(model.device), sparse_mask=mask).float()
                lp = F.log_softmax(logits[:, :-1], dim=-1)
                for r, (e, c, ctx, cont) in enumerate(group):
                    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                    tgt = torch.tensor(cont)
                    logp[e][c] = float(lp[r, pos, tgt].sum())
                bar.update(len(group))
                i = j
    finally:
        model.observer, model.sparse_mode = saved_observer, saved_mode
    hit = hit_norm = 0
    for ex, lps in zip(examples, logp):
        best = max(range(len(lps)), key=lambda c: lps[c])
        norm = [lp / max(1, len(ch)) for lp, ch in zip(lps, ex.choices)]
        best_norm = max(range(len(norm)), key=lambda c: norm[c])
        hit += best in ex.correct
        hit_norm += best_norm in ex.correct
    n = len(examples)
    return ChoiceResult(
        method,
        task.name,
        float(sparsity),
        meter.weighted() if sparse else 0.0,
        hit / n if n else math.nan,
        hit_norm / n if n else math.nan,
        n,
    )
